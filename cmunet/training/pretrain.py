"""The pre-training loop shared by every method: DeepSpeed engine, streaming data, checkpoints,
exports, MLflow. ``launch/pretrain.py`` only parses the config and calls :func:`pretrain`.

An epoch is a fixed number of optimizer steps per rank (``train.steps_per_epoch``, by default
the pool size over the global batch), so every rank runs the same number of steps. Randomness of
the views and masks comes from a generator seeded by (seed, step, micro-step, rank), and the data
stream is seeded by (seed, epoch, rank, worker): a resumed run continues exactly where the
checkpoint left it.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from cmunet.config import dump_config, flatten, save_config
from cmunet.data.overlap import refuse_test_overlap
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import ShardStream, load_manifest, make_loader
from cmunet.methods import build_method
from cmunet.models.export import save_export
from cmunet.models.unet import count_parameters
from cmunet.tracking.mlflow_run import Tracker
from cmunet.training import checkpoint as ckpt
from cmunet.training.distributed import DistInfo, init_distributed, shutdown
from cmunet.training.optim import (deepspeed_config, global_batch, make_optimizer, scaled_lr,
                                   warmup_cosine)
from cmunet.training.precision import autocast, use_bf16
from cmunet.training.pretrain_config import PretrainConfig


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pre-training; returns the export folder."""
    info = init_distributed()
    try:
        export = _Run(cfg, info).train()
    except BaseException:
        shutdown(wait=False)
        raise
    shutdown()
    return export


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


class _Run:
    def __init__(self, cfg: PretrainConfig, info: DistInfo):
        import deepspeed

        self.cfg, self.info, t = cfg, info, cfg.train
        self.out = Path(cfg.out)
        self.log = print if info.is_main else (lambda *a, **k: None)
        torch.manual_seed(cfg.seed)
        self.manifest = load_manifest(cfg.data.shards)
        splits = load_splits(Path(cfg.data.shards) / "splits.json")
        self.keys = [] if cfg.data.pool == "none" else pool_keys(splits, cfg.data.pool,
                                                                 cfg.data.ratio)
        refuse_test_overlap(cfg.data.shards, cfg.data.extra_shards)
        # (folder, keys or None = all) read by the stream: the pool, then the extra folders
        self.sources = ([] if cfg.data.pool == "none" else [(cfg.data.shards, self.keys)]) + [
            (folder, None) for folder in cfg.data.extra_shards]
        extra = sum(load_manifest(folder)["count"] for folder in cfg.data.extra_shards)
        self.pool_size = len(self.keys) + extra
        world = info.world_size
        self.global_batch = global_batch(t.micro_batch, t.grad_accum, world)
        self.lr = scaled_lr(t.base_lr, t.micro_batch, t.grad_accum, world)
        self.steps_per_epoch = t.steps_per_epoch or max(
            1, math.ceil(self.pool_size / self.global_batch))
        self.total_steps = self.steps_per_epoch * t.epochs
        self.bf16 = use_bf16(info.device, t.precision)

        method = build_method(cfg).to(info.device)
        optimizer = make_optimizer(method, self.lr, t.weight_decay, t.betas)
        schedule = warmup_cosine(self.total_steps,
                                 min(t.warmup_epochs, t.epochs) * self.steps_per_epoch,
                                 t.min_lr / self.lr if self.lr else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=method, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(t.micro_batch, t.grad_accum, world, t.zero_stage, t.clip_grad))
        self.method = self.engine.module
        if t.channels_last and t.zero_stage == 0:
            # after deepspeed.initialize: its start-up broadcast cannot send channels_last
            # tensors; under ZeRO 1/2 weights are views of flat buffers and stay contiguous.
            self.method.to(memory_format=torch.channels_last)

        self.state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "run_id": None}
        self.fingerprint = ckpt.fingerprint(cfg, world)
        self.ckpt_dir = self.out / "checkpoints"
        self._resume()
        if info.is_main:
            save_config(cfg, self.out / "config.yaml")
        resolved = {"resolved.lr": self.lr, "resolved.global_batch": self.global_batch,
                    "resolved.steps_per_epoch": self.steps_per_epoch,
                    "resolved.world_size": world, "resolved.bf16": self.bf16,
                    "resolved.pool_size": self.pool_size}
        self.tracker = Tracker(cfg.tracking, run_name=self.out.name,
                               params=None if self.state["run_id"] else {**flatten(cfg), **resolved},
                               tags={"cmunet.job": "pretrain", "cmunet.method": cfg.method},
                               enabled=info.is_main, run_id=self.state["run_id"])
        self.state["run_id"] = self.tracker.run_id
        self.log(f"{cfg.method}: {count_parameters(self.method, True) / 1e6:.2f} M trainable "
                 f"parameters, width {cfg.model.width}, views {cfg.view_size}^2 | {world} rank(s) "
                 f"on {info.device}, {'bf16 autocast' if self.bf16 else 'fp32'} | pool "
                 f"{cfg.data.pool}/{cfg.data.ratio}: {self.pool_size} images | global batch "
                 f"{t.micro_batch} x {t.grad_accum} x {world} = {self.global_batch} -> lr "
                 f"{t.base_lr:g} x {self.global_batch}/256 = {self.lr:.3g} | {self.steps_per_epoch}"
                 f" steps/epoch, {self.total_steps} steps")
        for warning in cfg.warnings():
            self.log(f"warning: {warning}")

    def _resume(self) -> None:
        found = ckpt.find_resumable(self.ckpt_dir, self.fingerprint) \
            if self.ckpt_dir.is_dir() else None
        if found is None:
            return
        tag, client_state = found
        _, loaded = self.engine.load_checkpoint(str(self.ckpt_dir), tag=tag)
        loaded = loaded or client_state  # DeepSpeed returns its own keys too: keep ours
        self.state.update({key: loaded[key] for key in self.state})
        self.log(f"resuming from {self.ckpt_dir / tag}: epoch {self.state['epoch']}, "
                 f"step {self.state['step']}")

    # ---- training -------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm import tqdm

        cfg, t, state = self.cfg, self.cfg.train, self.state
        stream = ShardStream(*self.sources[0], t.micro_batch, seed=cfg.seed,
                             extra=self.sources[1:],
                             shuffle_buffer=cfg.data.shuffle_buffer,
                             rank=self.info.rank, world_size=self.info.world_size)
        loader = make_loader(stream, cfg.data.num_workers, self.steps_per_epoch * t.grad_accum,
                             pin_memory=self.info.device.type == "cuda")
        bar = tqdm(total=self.total_steps, initial=state["step"], disable=not self.info.is_main,
                   unit="step", dynamic_ncols=True)
        self.window = _Window()
        for epoch in range(state["epoch"], t.epochs):
            stream.epoch = epoch
            stream.skip_batches = state["step_in_epoch"] * t.grad_accum
            remaining = (self.steps_per_epoch - state["step_in_epoch"]) * t.grad_accum
            first = None
            for micro, batch in zip(range(remaining), loader):
                images = batch["image"].to(self.info.device, non_blocking=True)
                if t.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                first = images[:4] if first is None else first
                self._micro_step(images, micro % t.grad_accum)
                if (micro + 1) % t.grad_accum == 0:
                    self._after_step(bar)
            state["epoch"], state["step_in_epoch"] = epoch + 1, 0
            self._epoch_end(epoch + 1, first)
        bar.close()
        return self._finish()

    def _micro_step(self, images: torch.Tensor, micro: int) -> None:
        seed = step_seed(self.cfg.seed, self.state["step"], micro, self.info.rank)
        gen = torch.Generator(device=self.info.device).manual_seed(seed)
        with autocast(self.info.device, self.bf16):
            loss, logs = self.engine(images, gen)
        self.engine.backward(loss)
        self.engine.step()
        self.window.add({k: v.detach() for k, v in logs.items()}, images.shape[0])

    def _after_step(self, bar) -> None:
        state, t = self.state, self.cfg.train
        state["step"] += 1
        state["step_in_epoch"] += 1
        extra = self.method.after_step(state["step"] / self.total_steps)
        bar.update(1)
        last = state["step"] == self.total_steps
        if state["step"] % t.log_every == 0 or last:
            self._log(extra, bar)
        if state["step"] % t.checkpoint_every == 0 or last:
            ckpt.save_checkpoint(self.engine, self.ckpt_dir, dict(state), self.fingerprint,
                                 t.keep_checkpoints, self.info.is_main)

    def _log(self, extra: dict, bar) -> None:
        means, images_per_s = self.window.flush()
        if not all(math.isfinite(v) for v in means.values()):
            raise FloatingPointError(f"non-finite loss at step {self.state['step']}: {means}; "
                                     "stopping (lower train.base_lr or check the data)")
        metrics = {**means, **extra, "lr": self.scheduler.get_last_lr()[0],
                   "images_per_s": images_per_s * self.info.world_size,
                   "epoch": self.state["step"] / self.steps_per_epoch}
        bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
        if self.info.is_main:
            self.tracker.log_metrics(metrics, step=self.state["step"])
            _append_csv(self.out / "log.csv", {"step": self.state["step"], **metrics})

    def _epoch_end(self, epoch: int, first: torch.Tensor | None) -> None:
        t, probe = self.cfg.train, self.cfg.probe
        last = epoch == t.epochs
        if not self.info.is_main:
            return
        if first is not None and (epoch % t.figure_every == 0 or last):
            self._figure(epoch, first)
        if probe.every and (epoch % probe.every == 0 or last):
            self._probe()
        if t.export_every and epoch % t.export_every == 0 and not last:
            self._publish(self.out / "exports" / f"epoch_{epoch:04d}",
                          f"exports/epoch_{epoch:04d}")

    def _probe(self) -> None:
        """Fine-tune a copy briefly on a few fine-tuning-pool images; log ``probe_dice``."""
        from cmunet.training.probe import probe_dice

        start = time.perf_counter()
        self.window.last["probe_dice"] = probe_dice(
            self.method.export_state(), self.cfg.model.width, self.cfg.data.shards,
            self.cfg.data.ratio, self.cfg.probe, self.cfg.seed, self.cfg.train.precision)
        self.tracker.log_metrics({"probe_dice": self.window.last["probe_dice"]},
                                 step=self.state["step"])
        self.log(f"probe at epoch {self.state['epoch']}: Dice "
                 f"{self.window.last['probe_dice']:.4f} ({time.perf_counter() - start:.0f} s)")

    def _figure(self, epoch: int, images: torch.Tensor) -> None:
        from cmunet.evaluation.figures import reconstruction_gallery

        self.method.eval()
        gen = torch.Generator(device=self.info.device).manual_seed(self.cfg.seed)
        rows = self.method.gallery(images, gen)
        self.method.train()
        if rows:
            path = reconstruction_gallery(rows, self.out / "figures" / f"recon_epoch{epoch:04d}.png",
                                          title=f"{self.cfg.method}, epoch {epoch}")
            self.tracker.log_artifact(path, "figures")

    def _export(self, folder: Path) -> Path:
        info = {"method": self.cfg.method, "width": self.cfg.model.width,
                "view_size": self.cfg.view_size, "epoch": self.state["epoch"],
                "step": self.state["step"], "parts": list(self.method.parts),
                "metrics": self.window.last}
        return save_export(folder, self.method.export_state(), info, dump_config(self.cfg),
                           self.manifest)

    def _publish(self, folder: Path, artifact_path: str) -> None:
        """Export, log to MLflow and register as a version of ``tracking.register_as``."""
        self._export(folder)
        self.tracker.log_artifact(folder, artifact_path)
        tags = {"epoch": self.state["epoch"], "step": self.state["step"],
                "method": self.cfg.method, "width": self.cfg.model.width,
                **{k: f"{v:.5f}" for k, v in self.window.last.items()}}
        self.tracker.register(artifact_path, self.cfg.tracking.register_as, tags)

    def _finish(self) -> Path:
        folder = self.out / "export"
        if self.info.is_main:
            self._publish(folder, "export")
            self.tracker.log_artifact(self.out / "config.yaml")
            self.tracker.close()
            self.log(f"export written to {folder}")
        return folder


class _Window:
    """Loss terms accumulated on the device between log points (no per-step host sync)."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count, self.images, self.start = 0, 0, time.perf_counter()
        self.last: dict[str, float] = {}

    def add(self, logs: dict[str, torch.Tensor], images: int) -> None:
        for key, value in logs.items():
            self.sums[key] = self.sums.get(key, 0) + value.float()
        self.count += 1
        self.images += images

    def flush(self) -> tuple[dict[str, float], float]:
        means = {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}
        rate = self.images / max(time.perf_counter() - self.start, 1e-9)
        self.sums, self.count, self.images, self.start = {}, 0, 0, time.perf_counter()
        self.last = means
        return means, rate


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
