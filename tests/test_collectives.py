"""What every rank must agree on, with 2 real gloo ranks (spawned processes): stopping on a
non-finite loss, the checkpoint to resume from, synchronised batch norm."""

from __future__ import annotations

import json
import os
import queue
import time
import types
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from cmunet.training.distributed import free_port

pytestmark = pytest.mark.slow  # every test starts 2 gloo ranks (spawned processes)
WORLD = 2


def _entry(fn, rank: int, port: int, results, args) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      OMP_NUM_THREADS="1")
    from cmunet.training.distributed import init_distributed, shutdown

    info = init_distributed()
    try:
        results.put((rank, "ok", fn(info, *args)))
    except Exception as err:
        results.put((rank, type(err).__name__, str(err)))
    finally:
        shutdown(wait=False)


def on_two_ranks(fn, *args, within: float = 90) -> dict[int, tuple[str, object]]:
    """``fn(info, *args)`` on 2 gloo ranks -> {rank: ("ok", result) or (error type, message)};
    a rank that has not answered ``within`` seconds (waiting in a collective) fails the test."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(fn, rank, port, results, args)) for rank in
             range(WORLD)]
    for proc in procs:
        proc.start()
    answers, deadline = {}, time.monotonic() + within
    try:
        while len(answers) < WORLD:
            rank, kind, value = results.get(timeout=max(0.1, deadline - time.monotonic()))
            answers[rank] = (kind, value)
    except queue.Empty:
        pass
    finally:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert len(answers) == WORLD, f"ranks {set(range(WORLD)) - set(answers)} hung; got {answers}"
    return answers


# ---- a non-finite loss on one rank stops every rank ---------------------------------------------

def _log_with_nan_on_rank_1(info, out: str):
    from cmunet.training.distributed import barrier
    from cmunet.training.pretrain import _Run, _Window

    window = _Window()
    window.add({"loss": torch.tensor(float("nan") if info.rank == 1 else 0.5)}, 2)
    run = types.SimpleNamespace(window=window, state={"step": 7}, info=info, out=Path(out),
                                steps_per_epoch=10, tracker=types.SimpleNamespace(
                                    log_metrics=lambda *a, **k: None),
                                scheduler=types.SimpleNamespace(get_last_lr=lambda: [1e-3]))
    _Run._log(run, {}, types.SimpleNamespace(set_postfix=lambda **k: None))
    barrier()  # the next collective of the training loop
    return "went on"


def test_nan_on_one_rank_stops_both_with_one_error(tmp_path):
    start = time.monotonic()
    answers = on_two_ranks(_log_with_nan_on_rank_1, str(tmp_path), within=60)
    assert answers[0] == answers[1]
    kind, message = answers[0]
    assert kind == "FloatingPointError"
    assert "step 7 on rank(s) [1]" in message
    assert time.monotonic() - start < 60


# ---- the checkpoint to resume from is rank 0's choice -------------------------------------------

def _write_checkpoint(folder: Path, step: int, want: dict) -> None:
    path = folder / f"step_{step:08d}"
    path.mkdir(parents=True)
    state = {"epoch": 0, "step": step, "step_in_epoch": step, "run_id": None}
    (path / "cmunet.json").write_text(json.dumps({"client_state": state, "fingerprint": want}))


def _resume_point_of_own_view(info, root: str):
    from cmunet.training.pretrain import resume_point

    want = {"world_size": WORLD}
    folder = Path(root) / f"view{info.rank}"  # a stale view: rank 1 misses the newest folder
    _write_checkpoint(folder, 4, want)
    if info.rank == 0:
        _write_checkpoint(folder, 8, want)
    tag, state = resume_point(folder, want)
    return tag, state["step"]


def test_ranks_seeing_different_checkpoints_resume_from_the_same_step(tmp_path):
    answers = on_two_ranks(_resume_point_of_own_view, str(tmp_path))
    assert answers[0] == answers[1] == ("ok", ("step_00000008", 8))


def _resume_point_of_other_setup(info, root: str):
    from cmunet.training.pretrain import resume_point

    folder = Path(root) / f"view{info.rank}"
    if info.rank == 0:  # only rank 0 sees checkpoints of another setup: it raises, 1 must too
        _write_checkpoint(folder, 4, {"world_size": 3})
    return resume_point(folder, {"world_size": WORLD})


def test_an_error_deciding_the_resume_point_reaches_every_rank(tmp_path):
    answers = on_two_ranks(_resume_point_of_other_setup, str(tmp_path), within=60)
    assert answers[0][0] == answers[1][0] == "ValueError"
    assert "another setup" in answers[1][1]


# ---- batch norm over the global batch ----------------------------------------------------------

def _bn_case(sync: bool):
    """A projector (the CM-UNet MLP) and a UNet block, their inputs and a loss weighting."""
    from cmunet.methods.heads import MLP
    from cmunet.models.sync_bn import use_global_batch_norm
    from cmunet.models.unet import DoubleConv

    torch.manual_seed(0)
    head, block = MLP(6, 8, 4), DoubleConv(2, 3)
    if sync:
        use_global_batch_norm(block)
    vectors, images = torch.randn(8, 6), torch.randn(8, 2, 5, 5)
    weights = torch.randn(8, 4), torch.randn(8, 3, 5, 5)
    return head, block, vectors, images, weights


def _bn_step(head, block, vectors, images, weights):
    vectors, images = vectors.requires_grad_(), images.requires_grad_()
    outputs = head(vectors), block(images)
    loss = sum((o * w).sum() for o, w in zip(outputs, weights))
    loss.backward()
    bns = [m for m in [*head.modules(), *block.modules()]
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    grads = {name: p.grad.clone() for name, p in [*head.named_parameters(prefix="head"),
                                                  *block.named_parameters(prefix="block")]}
    return {"outputs": [o.detach() for o in outputs], "inputs": [vectors.grad, images.grad],
            "grads": grads, "running": [(b.running_mean.clone(), b.running_var.clone())
                                        for b in bns]}


def _map(fn, tree):
    if isinstance(tree, dict):
        return {k: _map(fn, v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_map(fn, v) for v in tree)
    return fn(tree)


def _bn_half_batch(info):
    head, block, vectors, images, weights = _bn_case(sync=True)
    half = slice(4 * info.rank, 4 * info.rank + 4)
    result = _bn_step(head, block, vectors[half], images[half], [w[half] for w in weights])
    # as numpy: tensors would travel as shared memory that dies with this process
    return _map(lambda t: t.numpy(), result)


def test_batch_norm_over_two_gloo_ranks_equals_one_process_batch():
    answers = on_two_ranks(_bn_half_batch)
    assert all(kind == "ok" for kind, _ in answers.values()), answers
    ranks = [_map(torch.from_numpy, answers[r][1]) for r in range(WORLD)]
    head, block, vectors, images, weights = _bn_case(sync=False)
    whole = _bn_step(head, block, vectors, images, weights)

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)

    for i in range(2):  # outputs and input gradients: the halves of the whole batch's
        close(torch.cat([r["outputs"][i] for r in ranks]), whole["outputs"][i])
        close(torch.cat([r["inputs"][i] for r in ranks]), whole["inputs"][i])
    for name, grad in whole["grads"].items():  # DeepSpeed sums (then averages) these
        close(ranks[0]["grads"][name] + ranks[1]["grads"][name], grad)
    for r in ranks:
        for (mean, var), (whole_mean, whole_var) in zip(r["running"], whole["running"]):
            close(mean, whole_mean)
            close(var, whole_var)


# ---- rank 0 publishes alone at the end ------------------------------------------------------------

class _SlowPublishRun:
    """The end of a run: ``_Run._finish`` with an export + MLflow drain taking 4 s on rank 0."""

    def __init__(self, cfg, info, stop=None):
        self.info, self.out = info, Path(cfg.out)
        self.tracker = types.SimpleNamespace(log_artifact=lambda *a, **k: None,
                                             close=lambda: time.sleep(4))
        self.log = lambda *a, **k: None

    def _publish(self, folder, artifact_path):
        pass

    def train(self):
        return self.finish()


def _finish_times(info, out: str):
    from cmunet.training import pretrain

    _SlowPublishRun.finish = pretrain._Run._finish
    pretrain._Run = _SlowPublishRun  # only the end of the run
    cfg = types.SimpleNamespace(out=out, train=types.SimpleNamespace(collective_timeout_s=600),
                                data=types.SimpleNamespace(shards=out + "-shards", extra_shards=[]))
    start = time.monotonic()
    pretrain.pretrain(cfg)
    return time.monotonic() - start


def test_other_ranks_do_not_wait_for_rank_0s_publishing(tmp_path):
    answers = on_two_ranks(_finish_times, str(tmp_path))
    assert answers[0][0] == answers[1][0] == "ok", answers
    assert answers[0][1] >= 4 and answers[1][1] < answers[0][1] - 2
