"""bench/gpu_smoke.py (make gpu-check): without a GPU it says so and exits 0; --cpu runs the
whole flow (launcher pre-training, fine-tune, one search trial, segmentation) at a tiny size."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import ROOT

SCRIPT = str(ROOT / "bench" / "gpu_smoke.py")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_0():
    done = subprocess.run([sys.executable, SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "no CUDA device" in done.stdout, done.stderr


@pytest.mark.slow
def test_cpu_flow_runs_every_stage(tmp_path):
    done = subprocess.run([sys.executable, SCRIPT, "--cpu", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = done.stdout[done.stdout.index("stage        result"):]
    for stage in ("pre-train    2 steps", "fine-tune    2 epochs", "search       1 trial",
                  "segment      4 images"):
        assert stage in table, table
    assert table.count("bf16 active:") == 2


def test_compile_is_opt_in_and_keeps_parameter_names():
    from cmunet.config import load_config
    from cmunet.models.unet import UNet
    from cmunet.training.finetune import FinetuneConfig
    from cmunet.training.precision import compile_modules
    from cmunet.training.pretrain_config import PretrainConfig

    assert not load_config(PretrainConfig, ROOT / "configs/pretrain/cmunet.yaml").train.compile
    assert not load_config(FinetuneConfig, ROOT / "configs/finetune/paper.yaml").train.compile
    net = UNet(8)
    names = list(net.state_dict())
    compile_modules([net])  # compiled lazily, at the first call: nothing runs here
    assert list(net.state_dict()) == names  # checkpoints and exports keep their keys
    assert net._compiled_call_impl is not None
