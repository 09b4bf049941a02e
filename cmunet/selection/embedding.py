"""Embedding frames with the UNet encoder: pooled multi-scale features, streamed in batches.

A frame's embedding is the global average pool of each of the encoder's 5 stages, each pool
l2-normalised, concatenated and divided by sqrt(5): a unit vector of 31 x width numbers, where
every scale counts the same. Frames are read front to back from the shards (no shuffle buffer),
so a batch is all that is held in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from cmunet.data.stream import ShardStream, make_loader
from cmunet.models.unet import Encoder
from cmunet.tracking.mlflow_run import TrackingConfig


def build_encoder(export: str, model_width: int, seed: int,
                  tracking_uri: str = "") -> tuple[Encoder, str]:
    """The encoder of ``export`` (an export folder, a .safetensors file, ``runs:/``,
    ``models:/``; loaded as fine-tuning's ``init=`` loads it), or of a UNet of ``model_width``
    with random weights seeded by ``seed`` for ``none``; in eval mode, with a line on what it is."""
    from cmunet.training.finetune import FinetuneConfig, build_model

    model, report = build_model(FinetuneConfig(init=export, model_width=model_width, seed=seed,
                                               tracking=TrackingConfig(uri=tracking_uri)))
    what = (f"export {export}, width {model.width} ({report.summary()})" if report else
            f"random weights (seed {seed}), width {model.width}")
    return model.encoder.eval(), what


@torch.no_grad()
def pooled_features(encoder: Encoder, images: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) images -> (B, 31 x width) unit embeddings (see the module docstring)."""
    stages = encoder(images)
    pooled = [F.normalize(stage.float().mean(dim=(2, 3)), dim=1) for stage in stages]
    return torch.cat(pooled, dim=1) / math.sqrt(len(pooled))


def frame_batches(shards: str, keys: Sequence[str], batch_size: int,
                  num_workers: int = 0) -> Iterable[dict]:
    """Batches (``key``, z-scored ``image``) of the frames ``keys`` of ``shards``, each shard read
    once, front to back. The last batch may repeat a few frames (the stream fills it up)."""
    stream = ShardStream(shards, keys, batch_size, shuffle_buffer=1, rank=0, world_size=1,
                         epochs=1)
    return make_loader(stream, num_workers)


def embed_batches(encoder: Encoder, batches: Iterable[dict],
                  device: torch.device) -> Iterator[tuple[list[str], np.ndarray]]:
    """(keys, embeddings) of each batch, one batch at a time: a batch is let go before the next
    one is read."""
    for batch in batches:
        keys, images = batch["key"], batch["image"].to(device, non_blocking=True)
        del batch
        vectors = pooled_features(encoder, images).cpu().numpy()
        del images
        yield keys, vectors


def embed_keys(encoder: Encoder, batches: Iterable[dict], keys: Sequence[str],
               device: torch.device) -> np.ndarray:
    """The (len(keys), D) float32 embeddings of ``keys``, in that order, from ``batches``."""
    row = {key: i for i, key in enumerate(keys)}
    out, seen = None, np.zeros(len(keys), dtype=bool)
    for batch_keys, vectors in embed_batches(encoder, batches, device):
        if out is None:
            out = np.empty((len(keys), vectors.shape[1]), dtype=np.float32)
        rows = [row[key] for key in batch_keys]
        out[rows], seen[rows] = vectors, True
    if out is None or not seen.all():
        raise ValueError(f"{int((~seen).sum())} of {len(keys)} frames were not read from the "
                         "shards: the shard set is damaged; rebuild it with tools/shard.py")
    return out
