"""Inference on new angiograms: the ``launch/segment.py`` command and its library.

* :mod:`cmunet.inference.model` -- find and load a fine-tuned UNet and its preprocessing from a
  folder, a weights file or an MLflow reference (:func:`~cmunet.inference.model.load_model`).
* :mod:`cmunet.inference.predict` -- images in their own geometry -> vessel masks: the training
  preprocessing at the model's pixel scale, whole-image or sliding-window prediction, flip
  test-time augmentation, mapping back to the original size, small-component removal.
* :mod:`cmunet.inference.segment` -- the job: files -> masks, overlays, diameters, errors
  (:func:`~cmunet.inference.segment.run_segment`).

See docs/segment.md.
"""
