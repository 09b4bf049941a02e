"""Which frames to annotate: ranking embedded frames for a label budget.

Every strategy picks greedily, one frame at a time, among the *allowed* frames: those of the
patients with the fewest picks so far. So no patient gets a second frame before every patient
of the pool has one, nor a third before every patient has two (patients whose frames are all
picked drop out). Within that rule:

* ``typiclust`` (Hacohen et al. 2022, "Active learning on a budget"): k-means with k = budget;
  the next pick comes from the cluster with the fewest picks, the largest first, and is its most
  typical allowed frame (highest inverse mean distance to its 20 nearest neighbours in the
  cluster). Score: that typicality.
* ``kcenter`` (k-center greedy, Sener and Savarese 2018): the first frame is drawn at random;
  then each pick is the allowed frame farthest from every frame picked so far. Score: that
  distance (none for the first).
* ``random``: the reference; frames in a random order. Score: the random draw.

The same seed gives the same picks; another seed draws another k-means start, first k-center or
random order. Frames are compared in the leading principal components of their embeddings
(``dims``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from cmunet.selection.cluster import kmeans, principal_components, squared_distances, typicality

STRATEGIES = ("typiclust", "kcenter", "random")
# allowed frames (bool mask) -> (the frame picked, its score)
Chooser = Callable[[np.ndarray], tuple[int, float]]


def rank(embeddings: np.ndarray, budget: int, strategy: str = "typiclust", seed: int = 0,
         patients: Sequence[str] | None = None, dims: int = 64) -> tuple[list[int], list[float]]:
    """The rows of ``embeddings`` (N x D) to annotate, in pick order (at most ``budget``), and
    each pick's score. ``patients``: each row's patient (None: each row its own)."""
    x = np.asarray(embeddings)
    if x.ndim != 2 or not len(x):
        raise ValueError(f"embeddings must be a non-empty N x D matrix, got shape {x.shape}")
    if patients is not None and len(patients) != len(x):
        raise ValueError(f"{len(patients)} patients for {len(x)} embedded frames")
    if budget < 1:
        raise ValueError(f"budget must be at least 1, got {budget}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy != "random":  # random needs no distances
        x = principal_components(x, dims)
    budget = min(budget, len(x))
    choose = {"typiclust": _typiclust, "kcenter": _kcenter, "random": _random}[strategy]
    return diverse_picks(range(len(x)) if patients is None else patients, budget,
                         choose(x, budget, np.random.default_rng(seed)))


def select_keys(keys: Sequence[str], embeddings: np.ndarray, budget: int,
                strategy: str = "typiclust", seed: int = 0,
                patients: Sequence[str] | None = None, dims: int = 64) -> list[str]:
    """The keys to annotate for ``budget`` labels, in pick order: row i of ``embeddings`` is
    ``keys[i]`` (``patients[i]`` its patient). For a study arm that labels the frames a strategy
    picks instead of random ones; embeddings come from :func:`cmunet.selection.store.embed_pool`
    (``Embedded.rows`` selects the rows of some keys)."""
    if len(keys) != len(embeddings):
        raise ValueError(f"{len(keys)} keys for {len(embeddings)} embedded frames")
    order, _ = rank(embeddings, budget, strategy, seed, patients, dims)
    return [keys[i] for i in order]


def diverse_picks(patients: Sequence, budget: int,
                  choose: Chooser) -> tuple[list[int], list[float]]:
    """``budget`` greedy picks, each by ``choose`` among the unpicked frames of the patients with
    the fewest picks so far (see the module docstring)."""
    _, patient = np.unique(np.asarray(patients, dtype=str), return_inverse=True)
    picks_of = np.zeros(patient.max() + 1, dtype=np.int64)
    taken = np.zeros(len(patient), dtype=bool)
    order, scores = [], []
    for _ in range(budget):
        fewest = picks_of[patient[~taken]].min()
        index, score = choose(~taken & (picks_of[patient] == fewest))
        taken[index] = True
        picks_of[patient[index]] += 1
        order.append(int(index))
        scores.append(float(score))
    return order, scores


def _best(values: np.ndarray, allowed: np.ndarray) -> int:
    """The allowed index of the highest value (the lowest index among ties)."""
    return int(np.flatnonzero(allowed)[values[allowed].argmax()])


def _random(x: np.ndarray, budget: int, rng: np.random.Generator) -> Chooser:
    draw = rng.random(len(x))

    def choose(allowed: np.ndarray) -> tuple[int, float]:
        index = _best(draw, allowed)
        return index, draw[index]

    return choose


def _kcenter(x: np.ndarray, budget: int, rng: np.random.Generator) -> Chooser:
    far = np.full(len(x), np.inf)  # squared distance to the nearest frame picked so far
    tiebreak = rng.random(len(x))  # the first pick: a random frame

    def choose(allowed: np.ndarray) -> tuple[int, float]:
        first = np.isinf(far).all()
        index = _best(tiebreak if first else far, allowed)
        score = np.nan if first else float(np.sqrt(far[index]))
        far[:] = np.minimum(far, squared_distances(x, x[index][None])[:, 0])
        return index, score

    return choose


def _typiclust(x: np.ndarray, budget: int, rng: np.random.Generator) -> Chooser:
    labels = kmeans(x, budget, seed=int(rng.integers(2**32)))
    typical = np.zeros(len(x))
    for cluster in np.unique(labels):
        members = labels == cluster
        typical[members] = typicality(x[members])
    sizes = np.bincount(labels)
    picked = np.zeros(len(sizes), dtype=np.int64)

    def choose(allowed: np.ndarray) -> tuple[int, float]:
        open_ = np.unique(labels[allowed])  # clusters with an allowed frame
        # fewest picks first, then the largest cluster, then the lowest label
        cluster = open_[np.lexsort((open_, -sizes[open_], picked[open_]))[0]]
        index = _best(typical, allowed & (labels == cluster))
        picked[cluster] += 1
        return index, typical[index]

    return choose
