"""Which frames a study cell labels when its arm picks them with a strategy (``Arm.labels``).

``labels: random`` (the default) is :func:`cmunet.study.budget_keys`: a seeded round-robin draw
over the fine-tuning pool's patients. ``labels: typiclust`` or ``kcenter`` embeds the same pool
with a pre-trained encoder -- the export of ``label_encoder`` (another arm) or of the cell's own
pre-training -- and picks the budget with :func:`cmunet.selection.select_keys`, patient-diverse,
seeded by the cell's seed (so the seeds are different selections). Only the fine-tuning pool of
``data.ratio`` is ever embedded: no test frame can be picked. The embeddings of an export are
computed once per study (``OUT/selection/<export>/``, resumable) and shared by its cells.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cmunet.data.splits import pool_keys
from cmunet.selection import select_keys


def embedding_folder(out: Path, export: str) -> Path:
    """``OUT/selection/<name>``: the export's path under ``OUT/pretrain`` (``cmunet-s0-export``),
    else a digest of its path."""
    try:
        name = "-".join(Path(export).resolve().relative_to(out / "pretrain").parts)
    except ValueError:
        name = hashlib.sha256(str(export).encode()).hexdigest()[:16]
    return out / "selection" / name


def selected_keys(shards: str, splits: dict, ratio: str, budget: str, strategy: str, seed: int,
                  export: str, patient_of: dict[str, str], out: Path, log) -> list[str]:
    """The ``budget`` frames of the fine-tuning pool of ``ratio`` that ``strategy`` picks with
    the encoder of ``export`` (sorted, as :func:`cmunet.study.budget_keys` returns them)."""
    from cmunet.selection.embedding import build_encoder
    from cmunet.selection.store import embed_pool

    if not budget.isdigit():
        raise ValueError(f"labels={strategy} needs budgets that are numbers of images, not "
                         f"{budget!r}")
    if export == "none":
        raise ValueError(f"labels={strategy} needs a pre-trained encoder: set the variant's "
                         "label_encoder to a pre-trained arm")
    keys = sorted(pool_keys(splits, "finetune", ratio))
    if int(budget) > len(keys):
        raise ValueError(f"budget {budget} exceeds the {len(keys)} labelled images of the "
                         f"{ratio} pool")
    encoder, what = build_encoder(export, model_width=64, seed=seed)  # the export's width
    folder = embedding_folder(out, export)
    log(f"  labels picked by {strategy} (seed {seed}) with the encoder of {what}; "
        f"embeddings in {folder}")
    embedded = embed_pool(encoder, shards, keys, folder, log=lambda m: log(f"  {m}"))
    picks = select_keys(keys, embedded.vectors, int(budget), strategy, seed,
                        [patient_of[k] for k in keys])
    return sorted(picks)
