"""Semi-supervised fine-tuning: weak-to-strong consistency with an EMA teacher (``unlabelled.*``).

Every training step of :func:`cmunet.training.finetune.fit` also takes a batch of unlabelled
frames (``ratio`` per labelled image), each in two views of the same geometry: the weak view
(the fine-tuning augmentation, ``augment.*``) and the strong view (``unlabelled.strong``:
photometric steps and a cutout applied on top of the weak view, so no pixel moves). The teacher,
an exponential moving average of the student UNet (fp32 weights, no gradient, eval mode),
predicts the weak view; its foreground probability p gives the pseudo-label p > 0.5 of each pixel
where it is confident, max(p, 1 - p) >= ``threshold``. The student is trained on the strong view towards
these pseudo-labels with a cross-entropy over the confident pixels (divided by all pixels, as in
FixMatch), weighted by ``weight`` x a sigmoid ramp-up. After every optimizer step the teacher
moves towards the student (:func:`cmunet.methods.heads.ema_update`, as the momentum encoders of
pre-training: parameters averaged, BatchNorm statistics copied). Validation and the saved weights
are the student's, as without unlabelled frames.

The unlabelled frames (:func:`unlabelled_keys`) are never a test frame and never a frame of a
validation patient: ``source: pool`` takes the split's non-test frames (labelled or not) that are
neither fine-tuning labels nor validation frames, and leaves out every frame of a validation
patient; another shard set is refused if it holds a test image (same source-file SHA-256), and its
copies of validation images are left out. ``weight: 0`` (the default) builds none of this: the
run is plain fine-tuning, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cmunet.config import check
from cmunet.data import location
from cmunet.data.augment import Augment, AugmentConfig
from cmunet.data.overlap import find_test_images, with_hashes
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.index import SampleIndex
from cmunet.data.stream import ShardStream
from cmunet.methods.heads import ema_update
from cmunet.models.unet import UNet
from cmunet.training.precision import autocast

GEOMETRIC = ("p_flip", "p_rot90", "p_rotate", "p_crop")  # steps the strong view must not take


def strong_augment() -> AugmentConfig:
    """The default strong view: stronger photometric steps than ``augment.*`` and a cutout."""
    return AugmentConfig(p_flip=0.0, p_rot90=0.0, p_rotate=0.0, p_crop=0.0, p_intensity=0.8,
                         brightness=0.4, contrast=0.4, p_blur=0.5, max_blur_sigma=1.5,
                         p_noise=0.5, max_noise_std=0.2, p_cutout=0.5, max_cutout=0.4)


@dataclass
class UnlabelledConfig:
    weight: float = 0.0  # weight of the unlabelled consistency loss; 0 = off (pilot: no gain yet)
    # "pool": the split's non-test frames that are neither fine-tuning labels nor of a validation
    # patient; or another shard set (folder or URL; refused if it holds a test image)
    source: str = "pool"
    threshold: float = 0.95  # a pixel counts where the teacher's max(p, 1 - p) >= this
    rampup_epochs: int = 5  # the weight ramps up as exp(-5 (1 - t)^2), t = (epoch - 1) / this
    ratio: float = 2.0  # unlabelled images per labelled image in a batch
    ema: float = 0.99  # teacher momentum per step (min(ema, 1 - 1/(step + 1)) for early steps)
    # the strong view: applied on the weak view, so its geometric p_* must stay 0
    strong: AugmentConfig = field(default_factory=strong_augment)

    def __post_init__(self):
        check(self.weight >= 0, "weight", "must be >= 0")
        check(bool(self.source), "source", "must be 'pool' or a shard set (folder or URL)")
        check(0.5 <= self.threshold <= 1.0, "threshold", "must be in [0.5, 1]")
        check(self.rampup_epochs >= 0, "rampup_epochs", "must be >= 0")
        check(self.ratio > 0, "ratio", "must be positive")
        check(0.0 <= self.ema < 1.0, "ema", "must be in [0, 1)")
        for name in GEOMETRIC:
            check(getattr(self.strong, name) == 0, f"strong.{name}",
                  "must be 0: the strong view keeps the weak view's geometry (the pseudo-labels')")


# ---- the pieces of the loss ---------------------------------------------------------------------

def ramp(epoch: int, rampup_epochs: int) -> float:
    """The sigmoid ramp-up of epoch ``epoch`` (1-based): exp(-5 (1 - t)^2) with t = (epoch - 1) /
    ``rampup_epochs`` up to 1; 1 throughout with no ramp-up."""
    if rampup_epochs == 0:
        return 1.0
    t = min((epoch - 1) / rampup_epochs, 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def momentum(ema: float, step: int) -> float:
    """The teacher's momentum at optimizer step ``step`` (1-based): ``ema``, lowered for the first
    steps as in Mean Teacher so that a fresh teacher follows the student."""
    return min(ema, 1.0 - 1.0 / (step + 1))


def consistency_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                     threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, share of confident pixels) of (B, 2, H, W) logits: the cross-entropy of the student
    to the teacher's pseudo-labels (foreground probability > 0.5) on the pixels where the teacher's
    max(p, 1 - p) >= ``threshold``, summed and divided by all pixels; the others add exactly 0."""
    prob = teacher_logits.detach().float().softmax(dim=1)[:, 1]
    confident = torch.maximum(prob, 1.0 - prob) >= threshold
    ce = F.cross_entropy(student_logits.float(), (prob > 0.5).long(), reduction="none")
    return torch.where(confident, ce, 0.0).sum() / ce.numel(), confident.float().mean()


def make_teacher(student: UNet) -> UNet:
    """An fp32 copy of ``student`` on its device, without gradients, in eval mode."""
    parameter = next(student.parameters())
    teacher = UNet(student.width)
    teacher.load_state_dict(student.state_dict())
    teacher.to(parameter.device, torch.float32, memory_format=torch.channels_last)
    return teacher.requires_grad_(False).eval()


# ---- the unlabelled frames ----------------------------------------------------------------------

def unlabelled_keys(source: str, shards: str, train_keys: Sequence[str], val_keys: Sequence[str],
                    patient_of: dict[str, str]) -> tuple[str, list[str]]:
    """(shard set, keys) of the unlabelled frames of a fine-tuning on ``train_keys`` validated on
    ``val_keys`` (see the module docstring); a ValueError when none is left."""
    if source == "pool":
        splits = load_splits(location.join(shards, "splits.json"))
        val_patients = {patient_of[k] for k in val_keys}
        used = set(train_keys) | set(val_keys)
        keys = [k for k in pool_keys(splits, "train")
                if k not in used and patient_of[k] not in val_patients]
        test = [*pool_keys(splits, "test"), *splits.get("excluded", {}).get("keys", [])]
        refuse_leaks(keys, test, "test", source)
        refuse_leaks(keys, [k for k, p in patient_of.items() if p in val_patients],
                     "validation-patient", source)
        folder = shards
    else:
        found = find_test_images(shards, source)
        if found:
            raise ValueError(f"unlabelled.source {location.public(source)} holds {len(found)} "
                             f"test image(s) of {location.public(shards)} (same source-file "
                             f"SHA-256), e.g. {found[0][0]}: training on it would see the test "
                             "split; shard it again without them")
        keys = keys_without_copies(source, shards, val_keys)
        folder = source
    if not keys:
        raise ValueError(f"unlabelled.source={source}: no unlabelled frame is left outside the "
                         "test split, the fine-tuning labels and the validation patients")
    return folder, sorted(keys)


def keys_without_copies(source: str, shards: str, val_keys: Sequence[str]) -> list[str]:
    """The keys of ``source``'s frames that are not a copy (same source-file SHA-256) of a
    validation frame ``val_keys`` of ``shards``: read from the sample indexes' columns, so an
    archive-scale ``source`` costs its hash column, not one record per frame."""
    mine = SampleIndex.open(shards)
    wanted = mine["sha256"][mine.find(val_keys)[0]]
    wanted = np.ascontiguousarray(wanted[wanted.any(axis=1)]).view("S32").reshape(-1)
    theirs = SampleIndex.open(source)  # frames without a recorded hash (zeros) match nothing
    drop = np.zeros(len(theirs), dtype=bool)
    drop[with_hashes(theirs, wanted)] = True
    return theirs.keys_of(np.flatnonzero(~drop))


def refuse_leaks(chosen: Collection[str], forbidden: Collection[str], what: str,
                 source: str) -> None:
    """The guard of :func:`unlabelled_keys`: a RuntimeError if a chosen frame is forbidden."""
    leaked = sorted(set(chosen) & set(forbidden))
    if leaked:
        raise RuntimeError(f"unlabelled.source={source}: {len(leaked)} {what} frame(s) among the "
                           f"unlabelled frames (e.g. {leaked[0]}); this is a bug")


class TwoViews:
    """The transform of an unlabelled frame: the weak view (``weak``, or the frame as it is) and
    the strong view (``strong`` applied on the weak view), stacked as a (2, H, W) image."""

    def __init__(self, weak: Augment | None, strong: Augment | None):
        self.weak, self.strong = weak, strong

    def __call__(self, image: np.ndarray, mask: np.ndarray | None,
                 rng: np.random.Generator) -> tuple[np.ndarray, None]:
        if self.weak is not None:
            image, _ = self.weak(image, None, rng)
        strong = image if self.strong is None else self.strong(image, None, rng)[0]
        return np.stack([image, strong]), None


def unlabelled_stream(folder: str, keys: Sequence[str], batch_size: int, transform: TwoViews,
                      seed: int) -> ShardStream:
    """The endless, seeded stream of unlabelled batches (this process alone: rank 0 of 1); its
    memory is bounded by the shuffle buffer, whatever the size of the archive."""
    return ShardStream(folder, keys, batch_size, seed=seed, transform=transform, rank=0,
                       world_size=1, shuffle_buffer=max(64, 4 * batch_size))


# ---- the unlabelled half of a training step -----------------------------------------------------

class Consistency:
    """Owns the teacher and the unlabelled batches of one :func:`fit`: :meth:`start_epoch`,
    then per step :meth:`loss` (added to the supervised loss before ``backward``) and
    :meth:`update` (after ``optimizer.step()``), and :meth:`summary` for the epoch's history row.
    The epoch's sums stay on the device until :meth:`summary` (no read per step)."""

    def __init__(self, cfg: UnlabelledConfig, student: UNet, batches: Iterator[dict],
                 device: torch.device, bf16: bool):
        self.cfg, self.batches, self.device, self.bf16 = cfg, batches, device, bf16
        self.teacher = make_teacher(student)
        self.steps, self.scale = 0, 0.0
        self.start_epoch(1)

    def start_epoch(self, epoch: int) -> None:
        self.scale = self.cfg.weight * ramp(epoch, self.cfg.rampup_epochs)
        self.sums = torch.zeros(2, device=self.device)  # unweighted loss, confident share
        self.count = 0

    def loss(self, student: UNet) -> torch.Tensor:
        """The weighted consistency loss of the next unlabelled batch (a graph to the student)."""
        views = next(self.batches)["image"].to(self.device, non_blocking=True)  # (B, 1, 2, H, W)
        weak, strong = (views[:, 0, i:i + 1].contiguous(memory_format=torch.channels_last)
                        for i in (0, 1))
        with torch.no_grad(), autocast(self.device, self.bf16):
            teacher_logits = self.teacher(weak)
        with autocast(self.device, self.bf16):
            student_logits = student(strong)
        loss, confident = consistency_loss(student_logits, teacher_logits, self.cfg.threshold)
        self.sums += torch.stack([loss.detach(), confident])
        self.count += 1
        return self.scale * loss

    def update(self, student: UNet) -> None:
        self.steps += 1
        ema_update(self.teacher, student, momentum(self.cfg.ema, self.steps))

    def summary(self) -> dict[str, float]:
        """The epoch's mean unweighted ``unlabelled_loss``, mean share of ``confident`` pixels and
        the ``unlabelled_weight`` (weight x ramp) it was given."""
        loss, confident = (self.sums / max(self.count, 1)).tolist()
        return {"unlabelled_loss": loss, "confident": confident, "unlabelled_weight": self.scale}
