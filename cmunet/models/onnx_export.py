"""The fine-tuned segmentation UNet as an ONNX model, for runtimes without PyTorch or cmunet.

The ONNX model computes what the pyfunc model (cmunet/tracking/segmenter.py) returns by default:

* input ``image``: float32 ``(N, 1, H, W)``, preprocessed and z-scored as in training (see
  ``preprocessing.json``); N, H and W are dynamic, H and W must be multiples of 16 (the graph's
  input dims read ``batch``, ``16*rows16``, ``16*cols16``);
* output ``probability``: float32 ``(N, H, W)``, the softmax probability of the vessel class.

It is exported with ``torch.onnx.export`` (the ``torch.export``-based exporter, opset
:data:`OPSET`, weights inside the one file), batch norm in inference mode, and
:func:`check_onnx` compares onnxruntime on the CPU with PyTorch on inputs of other batch sizes and
sides than the export's example: the probabilities must agree within :data:`TOLERANCE`.

    python -m cmunet.models.onnx_export --model OUT/model --out model.onnx
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cmunet.models.unet import UNet

OPSET = 18  # supported by the installed torch's exporter and onnxruntime >= 1.14
TOLERANCE = 1e-4  # largest |probability(onnxruntime) - probability(torch)| accepted, fp32 on CPU
#: (N, 1, H, W) of the inputs :func:`check_onnx` compares: other batch sizes and sides than the
#: export's example (2, 1, 32, 48), a non-square one among them.
CHECK_SHAPES: tuple[tuple[int, int, int, int], ...] = ((1, 1, 16, 16), (3, 1, 64, 48))
INPUT, OUTPUT = "image", "probability"


class VesselProbability(nn.Module):
    """``net``'s vessel probability: softmax over the 2-class head, class 1."""

    def __init__(self, net: UNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image).softmax(dim=1)[:, 1]


def export_onnx(net: UNet, path: str | Path, opset: int = OPSET) -> Path:
    """Write ``net`` (a copy, in eval mode, fp32 on the CPU) as :class:`VesselProbability` to
    ``path`` with dynamic batch, height and width; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = VesselProbability(copy.deepcopy(net).to("cpu", torch.float32)).eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    rows, cols = torch.export.Dim("rows16", min=1, max=4096), torch.export.Dim("cols16", min=1,
                                                                                 max=4096)
    example = torch.zeros(2, 1, 32, 48)  # batch and sides > 1: none of them is specialised
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)  # not "torchvision is not installed" four times
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning, UserWarning))
            program = torch.onnx.export(
                model, (example,), input_names=[INPUT], output_names=[OUTPUT],
                dynamic_shapes={INPUT: {0: batch, 2: 16 * rows, 3: 16 * cols}},
                opset_version=opset, external_data=False, verbose=False)
    finally:
        exporter_log.setLevel(level)
    temporary = path.with_name(f".{path.name}.tmp")
    program.save(temporary, external_data=False)
    temporary.replace(path)  # never a half-written model
    return path


def onnx_session(path: str | Path):
    """An onnxruntime session of the ONNX file on the CPU."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_onnx(path: str | Path, net: UNet, shapes: Sequence[Sequence[int]] = CHECK_SHAPES,
               tolerance: float = TOLERANCE, seed: int = 0) -> float:
    """The largest difference between the probabilities of the ONNX file (onnxruntime, CPU) and of
    ``net`` (PyTorch, fp32, CPU) on seeded normal inputs of ``shapes``; a ValueError when it
    exceeds ``tolerance``."""
    session = onnx_session(path)
    reference = VesselProbability(copy.deepcopy(net).to("cpu", torch.float32)).eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for shape in shapes:
        image = torch.randn(*shape, generator=generator)
        with torch.no_grad():
            expected = reference(image).numpy()
        got = session.run([OUTPUT], {INPUT: image.numpy()})[0]
        if got.shape != expected.shape:
            raise ValueError(f"{path}: output of shape {got.shape} for an input of {tuple(shape)}; "
                             f"PyTorch gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    if worst > tolerance:
        raise ValueError(f"{path}: onnxruntime and PyTorch probabilities differ by up to "
                         f"{worst:.2e} (> {tolerance:g}); do not deploy this file")
    return worst


def main(argv: list[str] | None = None) -> int:
    from cmunet.inference.model import find_weights, load_unet
    from cmunet.tracking.registry import resolve

    parser = argparse.ArgumentParser(description="Export a fine-tuned UNet to ONNX and check it "
                                                 "against onnxruntime (see docs/segment.md).")
    parser.add_argument("--model", required=True, help="fine-tuning output folder, .safetensors "
                        "file, runs:/... or models:/NAME@ALIAS")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--tracking-uri", default="", help="MLflow store of runs:/ and models:/")
    args = parser.parse_args(argv)
    try:
        weights = find_weights(resolve(args.model, args.tracking_uri), args.model)
        net = load_unet(weights)
        path = export_onnx(net, args.out, args.opset)
        worst = check_onnx(path, net)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {path} (opset {args.opset}); onnxruntime agrees with PyTorch within "
          f"{worst:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
