"""The code of the registered segmentation model ("models from code": MLflow copies this file into
the model and runs it on loading, so no Python object is pickled). See cmunet/tracking/segmenter.py.
"""

import mlflow

from cmunet.tracking.segmenter import Segmenter

mlflow.models.set_model(Segmenter())
