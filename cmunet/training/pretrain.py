"""The pre-training loop shared by every method: DeepSpeed engine, streaming data, checkpoints,
exports, MLflow. ``launch/pretrain.py`` only parses the config and calls :func:`pretrain`.

An epoch is one pass over the pool (every image once, extra folders by their weight; see
:mod:`cmunet.data.stream`): the pool size over the global batch, rounded up, optimizer steps on
every rank (``train.steps_per_epoch`` sets another length). Randomness of
the views and masks comes from a generator seeded by (seed, step, micro-step, rank), and the data
stream is seeded by (seed, epoch, rank, worker): a resumed run continues exactly where the
checkpoint left it.

SIGTERM or SIGINT (preemption, ``scancel``, Ctrl-C) stops the job after the current optimizer
step: every rank writes the checkpoint of that step, rank 0 writes ``OUT/preempted.json``, and
:class:`~cmunet.preempt.Preempted` is raised (``launch/pretrain.py`` exits with 75). On resume,
``log.csv`` and the MLflow run continue from the resumed step: nothing is logged twice.
The signal may reach one rank, every process of the group (DataLoader workers ignore it and
die with their rank) or only a launcher: a launcher above the rank that goes away (the
``deepspeed`` runner exits on SIGTERM without passing it on) counts as a SIGTERM
(:meth:`~cmunet.preempt.StopRequest.watch_launchers`); see docs/multinode.md.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path

import numpy as np
import torch

from cmunet.config import dump_config, flatten, save_config
from cmunet.data import location
from cmunet.data.overlap import refuse_test_overlap
from cmunet.data.splits import load_splits, pool_ids
from cmunet.data.stream import ShardStream, load_manifest, make_loader
from cmunet.log import bar_disable, logger, setup_logging
from cmunet.methods import build_method
from cmunet.models.export import FILES as EXPORT_FILES, save_export
from cmunet.models.unet import count_parameters
from cmunet.outdir import check_only, check_out
from cmunet.preempt import Preempted, StopRequest, loader_worker_init, stop_signals_blocked
from cmunet.tracking.mlflow_run import Tracker
from cmunet.training import checkpoint as ckpt
from cmunet.training.distributed import (DistInfo, barrier, decided_by_main, init_distributed,
                                         ranks_where, shutdown)
from cmunet.training.optim import (batch_mismatch, deepspeed_config, deepspeed_engine,
                                   global_batch, make_optimizer, scaled_lr, warmup_cosine)
from cmunet.training.precision import compile_modules, speedups, use_bf16
from cmunet.training.pretrain_config import PretrainConfig

LOG = logger(__name__)


def pretrain(cfg: PretrainConfig) -> Path:
    """Run (or resume) pre-training; returns the export folder. Raises Preempted after the
    checkpoint of a SIGTERM / SIGINT."""
    check_out(cfg.out, {"data.shards": cfg.data.shards,
                        **{f"data.extra_shards[{i}]": f for i, f in enumerate(cfg.data.extra_shards)}})
    for folder in [Path(cfg.out) / "export", *sorted(Path(cfg.out).glob("exports/*"))]:
        check_only(folder, EXPORT_FILES, "the export")  # replaced when it is written
    stop = StopRequest()
    stop.watch_launchers()  # a launcher that dies without passing its signal on is one too
    info = init_distributed(cfg.train.collective_timeout_s, lambda: stop.signum)
    try:
        export = _Run(cfg, info, stop).train()
    except Preempted:
        shutdown()  # every rank stopped at the same step
        raise
    except BaseException:
        shutdown(wait=False)
        raise
    finally:
        stop.close()
    shutdown(wait=False)  # the ranks met in _finish; rank 0 publishes after that, alone
    return export


def pretrain_stream(cfg: PretrainConfig, rank: int, world_size: int) -> ShardStream:
    """The stream of a pre-training run: the pool of ``data.shards`` (none with
    ``data.pool=none``), then the extra folders with their weights."""
    t = cfg.train
    keys = [] if cfg.data.pool == "none" else pool_ids(  # sample ids: an integer array
        load_splits(location.join(cfg.data.shards, "splits.json")), cfg.data.pool, cfg.data.ratio)
    weights = cfg.data.extra_weights or [1.0] * len(cfg.data.extra_shards)
    # (folder, keys or None = all, visits per epoch): the pool, then the extra folders
    sources = ([] if cfg.data.pool == "none" else [(cfg.data.shards, keys, 1.0)]) + [
        (folder, None, w) for folder, w in zip(cfg.data.extra_shards, weights)]
    (folder, keys, weight), rest = sources[0], sources[1:]
    return ShardStream(folder, keys, t.micro_batch, seed=cfg.seed, weight=weight,
                       extra=[(f, k) for f, k, _ in rest], extra_weights=[w for _, _, w in rest],
                       shuffle_buffer=cfg.data.shuffle_buffer, rank=rank, world_size=world_size)


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, micro, rank]).generate_state(1)[0])


class _Run:
    def __init__(self, cfg: PretrainConfig, info: DistInfo, stop: StopRequest | None = None):
        self.cfg, self.info, t = cfg, info, cfg.train
        self.out = Path(cfg.out)
        setup_logging(info.rank)  # other ranks show warnings and errors only
        self.log = LOG.info if info.is_main else (lambda *a, **k: None)
        self.warn = LOG.warning if info.is_main else (lambda *a, **k: None)  # said once
        torch.manual_seed(cfg.seed)
        location.configure(cfg.data.remote)  # the stream carries it into its workers
        self.manifest = load_manifest(cfg.data.shards)
        splits = load_splits(location.join(cfg.data.shards, "splits.json"))
        refuse_test_overlap(cfg.data.shards, cfg.data.extra_shards)
        self.stream = pretrain_stream(cfg, info.rank, info.world_size)
        self.pool_size = self.stream.epoch_size  # samples of one pass (extra folders weighted)
        world = info.world_size
        self.global_batch = global_batch(t.micro_batch, t.grad_accum, world)
        self.lr = scaled_lr(t.base_lr, t.micro_batch, t.grad_accum, world)
        self.steps_per_epoch = t.steps_per_epoch or max(
            1, math.ceil(self.pool_size / self.global_batch))
        self.stream.batches_per_epoch = self.steps_per_epoch * t.grad_accum
        self.stream.epochs = t.epochs
        self.total_steps = self.steps_per_epoch * t.epochs
        self.bf16 = use_bf16(info.device, t.precision)
        mismatch = batch_mismatch(t.micro_batch, t.grad_accum, world, t.global_batch)
        if mismatch:
            self.warn(f"warning: {mismatch}")

        speedups(info.device)
        method = build_method(cfg).to(info.device)
        method.autocast_device = info.device.type if self.bf16 else None
        if t.compile:
            compile_modules([getattr(method, name) for name in set(method.parts.values())])
        optimizer = make_optimizer(method, self.lr, t.weight_decay, t.betas)
        schedule = warmup_cosine(self.total_steps,
                                 min(t.warmup_epochs, t.epochs) * self.steps_per_epoch,
                                 t.min_lr / self.lr if self.lr else 0.0)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
        self.engine, self.scheduler = deepspeed_engine(
            method, optimizer,
            deepspeed_config(t.micro_batch, t.grad_accum, world, t.zero_stage, t.clip_grad),
            scheduler, t.channels_last)
        self.method = self.engine.module

        self.state = {"epoch": 0, "step": 0, "step_in_epoch": 0, "run_id": None}
        self.fingerprint = ckpt.fingerprint(cfg, world)
        self.ckpt_dir = self.out / "checkpoints"
        self._resume()
        self.stop = stop or StopRequest()
        self.logged_upto = 0  # steps the resumed MLflow run already holds
        if info.is_main:
            save_config(cfg, self.out / "config.yaml")
            (self.out / PREEMPTED_FILE).unlink(missing_ok=True)
            self.logged_upto = _trim_csv(self.out / "log.csv", self.state["step"])
            if not self.state["run_id"]:
                self.logged_upto = 0
        resolved = {"resolved.lr": self.lr, "resolved.global_batch": self.global_batch,
                    "resolved.steps_per_epoch": self.steps_per_epoch,
                    "resolved.world_size": world, "resolved.bf16": self.bf16,
                    "resolved.pool_size": self.pool_size}
        self.tracker = Tracker(cfg.tracking, run_name=self.out.name,
                               params=None if self.state["run_id"] else {**flatten(cfg), **resolved},
                               tags={"cmunet.job": "pretrain", "cmunet.method": cfg.method},
                               enabled=info.is_main, run_id=self.state["run_id"],
                               shards=[s for s in (cfg.data.shards, *cfg.data.extra_shards) if s])
        self.state["run_id"] = self.tracker.run_id
        self.log(f"{cfg.method}: {count_parameters(self.method, True) / 1e6:.2f} M trainable "
                 f"parameters, width {cfg.model.width}, views {cfg.view_size}^2 | {world} rank(s) "
                 f"on {info.device}, {'bf16 autocast' if self.bf16 else 'fp32'} | pool "
                 f"{cfg.data.pool}/{cfg.data.ratio}: {self.pool_size} images | global batch "
                 f"{t.micro_batch} x {t.grad_accum} x {world} = {self.global_batch} -> lr "
                 f"{t.base_lr:g} x {self.global_batch}/256 = {self.lr:.3g} | {self.steps_per_epoch}"
                 f" steps/epoch, {self.total_steps} steps")
        for warning in cfg.warnings():
            self.warn(f"warning: {warning}")

    def _resume(self) -> None:
        found = resume_point(self.ckpt_dir, self.fingerprint)
        if found is None:
            return
        tag, client_state = found
        loaded = ckpt.load_checkpoint(self.engine, self.ckpt_dir, tag)
        loaded = loaded or client_state  # DeepSpeed returns its own keys too: keep ours
        self.state.update({key: loaded[key] for key in self.state})
        self.log(f"resuming from {self.ckpt_dir / tag}: epoch {self.state['epoch']}, "
                 f"step {self.state['step']}")

    # ---- training -------------------------------------------------------------------------
    def train(self) -> Path:
        from tqdm import tqdm

        cfg, t, state = self.cfg, self.cfg.train, self.state
        # one loader iterator for the whole job: the stream runs from the resumed position to
        # the last epoch without stopping, so workers and shuffle buffers live across epochs
        self.stream.epoch = state["epoch"]
        self.stream.skip_batches = state["step_in_epoch"] * t.grad_accum
        # the workers ignore SIGTERM / SIGINT (a signal to the process group reaches them too):
        # this rank stops at an agreed step and ends them; held back until they ignore it
        with stop_signals_blocked():
            batches = iter(make_loader(self.stream, cfg.data.num_workers,
                                       pin_memory=self.info.device.type == "cuda",
                                       worker_init_fn=loader_worker_init()))
        bar = tqdm(total=self.total_steps, initial=state["step"], unit="step", dynamic_ncols=True,
                   disable=bar_disable(self.info.is_main))  # rank 0, in a terminal
        self.window = _Window()
        for epoch in range(state["epoch"], t.epochs):
            remaining = (self.steps_per_epoch - state["step_in_epoch"]) * t.grad_accum
            first = None
            for micro, batch in zip(range(remaining), batches):
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
        loss, logs = self.engine(images, gen)  # bf16 autocast inside: method.autocast_device
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
        saved = state["step"] % t.checkpoint_every == 0 or last
        if saved:
            ckpt.save_checkpoint(self.engine, self.ckpt_dir, dict(state), self.fingerprint,
                                 t.keep_checkpoints, self.info.is_main)
        # ranks agree on a stop request through a small all-reduce: at log points and
        # checkpoints only, so the step itself never syncs (a launcher that was signalled
        # kills its ranks 30 s later: log_every steps and a checkpoint must fit in that)
        asked = saved or state["step"] % t.log_every == 0 or self.info.world_size == 1
        signum = self.stop.agreed(self.info.device) if asked else 0
        if signum and not last:
            if not saved:
                ckpt.save_checkpoint(self.engine, self.ckpt_dir, dict(state), self.fingerprint,
                                     t.keep_checkpoints, self.info.is_main)
            if self.info.is_main:
                self.tracker.close("KILLED")
                (self.out / PREEMPTED_FILE).write_text(
                    f'{{"step": {state["step"]}, "signal": {signum}}}\n')
            raise Preempted(state["step"], signum)

    def _log(self, extra: dict, bar) -> None:
        means, images_per_s = self.window.flush()
        bad = ranks_where(not all(math.isfinite(v) for v in means.values()))
        if bad:  # every rank stops here together, none waits in the next collective
            raise FloatingPointError(f"non-finite loss at step {self.state['step']} on rank(s) "
                                     f"{bad}; stopping (lower train.base_lr or check the data)")
        metrics = {**means, **extra, "lr": self.scheduler.get_last_lr()[0],
                   "images_per_s": images_per_s * self.info.world_size,
                   "epoch": self.state["step"] / self.steps_per_epoch}
        bar.set_postfix(loss=f"{means['loss']:.4f}", img_s=f"{metrics['images_per_s']:.1f}")
        if self.info.is_main:
            if self.state["step"] > self.logged_upto:  # a resumed run redoes logged steps
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
        periodic = (t.export_every and epoch % t.export_every == 0) or epoch in t.export_epochs
        if periodic and not last:
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
                "step": self.state["step"], "global_batch": self.global_batch,
                "parts": list(self.method.parts),
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
        barrier()  # training is over on every rank: none waits on rank 0's export and MLflow
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


PREEMPTED_FILE = "preempted.json"  # written when a signal stopped the job (SLURM requeue scripts)


def _trim_csv(path: Path, step: int) -> int:
    """Drop the rows of ``log.csv`` after ``step`` (they are redone from the checkpoint); returns
    the highest step it held (0 without a file)."""
    if not path.is_file():
        return 0
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        rows, fields = list(reader), reader.fieldnames or []
    keep = [row for row in rows if int(row["step"]) <= step]
    if len(keep) < len(rows):
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(keep)
        tmp.replace(path)
    return max((int(row["step"]) for row in rows), default=0)


def _append_csv(path: Path, row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)


def resume_point(folder: Path, want: dict) -> tuple[str, dict] | None:
    """(tag, client state) of the checkpoint to resume from, chosen by rank 0 and shared: ranks
    reading a shared file system may list different folders and must not resume from different
    steps (a rank that cannot see the chosen one then fails loading it, naming it)."""
    return decided_by_main(
        lambda: ckpt.find_resumable(folder, want) if folder.is_dir() else None)
