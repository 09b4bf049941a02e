"""Which frames to annotate: cold-start selection with the pre-trained encoder (``cmunet-select``).

* :mod:`cmunet.selection.config` -- :class:`SelectConfig`, the job's typed config;
* :mod:`cmunet.selection.embedding` -- the encoder and its pooled multi-scale embeddings;
* :mod:`cmunet.selection.store` -- a pool's embeddings, chunk by chunk, resumable;
* :mod:`cmunet.selection.cluster` -- distances, principal components, k-means, typicality;
* :mod:`cmunet.selection.strategies` -- ``typiclust``, ``kcenter``, ``random``, patient-diverse;
  :func:`select_keys` for callers that hold embeddings (a study arm);
* :mod:`cmunet.selection.outputs` -- ``picks.csv`` and the contact sheet;
* :mod:`cmunet.selection.job` -- the whole job (:func:`run_select`).
"""

from cmunet.selection.strategies import STRATEGIES, rank, select_keys

__all__ = ["STRATEGIES", "rank", "select_keys"]
