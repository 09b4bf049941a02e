"""Device and mixed precision: bf16 autocast where the hardware runs it fast, fp32 weights always.

On CUDA, bf16 autocast needs an Ampere or newer GPU. On CPU it pays only with native bf16 dot
products (AVX512-BF16 or AMX): there bf16 autocast with channels_last runs a UNet several times
faster than fp32; elsewhere it would be slower than fp32, so ``auto`` falls back to fp32.
Parameters, optimizer state and EMA copies stay fp32 (autocast casts per operation).
"""

from __future__ import annotations

import contextlib
import functools
import os
from typing import Literal

import torch

Precision = Literal["auto", "bf16", "fp32"]


def default_device() -> torch.device:
    """``cuda:LOCAL_RANK`` modulo the GPUs this process sees (one each under SLURM's
    ``--gpu-bind`` or Kubernetes, all of the node's under deepspeed/torchrun), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) %
                            torch.cuda.device_count())
    return torch.device("cpu")


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AVX512-BF16 or AMX-BF16 instructions (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(device: torch.device, precision: Precision) -> bool:
    if precision == "fp32":
        return False
    if device.type == "cuda":  # Ampere or newer; older GPUs emulate bf16, slower than fp32
        supported = torch.cuda.is_bf16_supported(including_emulation=False)
    else:
        supported = device.type == "cpu" and cpu_has_fast_bf16()
    if precision == "bf16" and not supported and device.type != "cpu":
        raise ValueError(f"precision=bf16 requested but {device} has no native bf16 (Ampere or "
                         "newer); use precision=fp32 or auto")
    return supported or precision == "bf16"


def speedups(device: torch.device) -> None:
    """Process-wide settings for training on ``device``.

    * GPU: cuDNN picks the fastest convolution algorithms for our fixed input sizes and fp32
      matrix products use TF32 (convolutions do by default).
    * CPU: :func:`keep_freed_memory`.
    """
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    elif device.type == "cpu":
        keep_freed_memory()


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory() -> bool:
    """Let glibc's malloc serve large blocks from its heap (no mmap) and keep freed heap rather
    than return it to the system. A training step allocates and frees the same large
    activations and gradients every step; by default each block over 32 MiB (and, once freed,
    heap beyond the trim threshold) comes back as fresh pages that the kernel zeroes and faults
    in one by one. On a 2-core CPU that cost 10 % of a CM-UNet step at width 32 and 256² views
    and 9 % at width 16 and 128². The price: the process keeps its peak heap (a step's working
    set; 2.6 instead of 2.1-2.2 GiB resident in the benchmark at width 32, flat over the steps).
    ``CMUNET_KEEP_FREED_MEMORY=0`` in the environment keeps glibc's defaults. True when the C
    library took the settings (not glibc, or switched off: False, nothing changes)."""
    import ctypes

    if os.environ.get("CMUNET_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def compile_modules(modules: list[torch.nn.Module]) -> None:
    """``train.compile``: compile each module's forward with ``torch.compile`` in place
    (``Module.compile``), so parameter names, checkpoints and exports stay as they are. Opt-in:
    it pays on GPUs for long runs; the first steps are slower while kernels are compiled."""
    for module in modules:
        module.compile()


def activation_dtypes(module: torch.nn.Module, run) -> set[torch.dtype]:
    """The dtypes of the outputs of ``module``'s convolutions while ``run()`` executes (e.g. one
    training step): ``{torch.bfloat16}`` when bf16 autocast is really active there,
    ``{torch.float32}`` when something switched it off. (Projection heads run in fp32 by
    design: :class:`cmunet.methods.heads.MLP`.)"""
    dtypes: set[torch.dtype] = set()
    convolutions = (torch.nn.Conv2d, torch.nn.ConvTranspose2d)
    hooks = [m.register_forward_hook(lambda _m, _i, out: dtypes.add(out.dtype))
             for m in module.modules() if isinstance(m, convolutions)]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return dtypes


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on ``device`` when enabled, else a no-op context."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
