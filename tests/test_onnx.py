"""The ONNX export of the segmentation UNet: dynamic batch and sides, onnxruntime on the CPU within
the stated tolerance of PyTorch, the command, and a mismatch reported."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from safetensors.torch import save_file

from cmunet.models.onnx_export import (INPUT, OPSET, OUTPUT, TOLERANCE, VesselProbability,
                                       check_onnx, main, onnx_session)
from cmunet.models.unet import UNet
from cmunet.training.finetune import cpu_state


def trained_like(width: int = 8, seed: int = 0) -> UNet:
    """A UNet with random weights and non-trivial batch-norm statistics, in eval mode."""
    torch.manual_seed(seed)
    net = UNet(width)
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    return net.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The command's export of a fine-tuning folder (the one export of this module: ~15 s)."""
    folder = tmp_path_factory.mktemp("onnx")
    net = trained_like()
    save_file(cpu_state(net), folder / "best.safetensors")
    assert main(["--model", str(folder), "--out", str(folder / "model.onnx")]) == 0
    return net, folder / "model.onnx"


def test_onnx_model_has_dynamic_batch_and_sides_and_matches_torch(exported):
    net, path = exported
    model = onnx.load(str(path))
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == OPSET
    dims = [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in (model.graph.input[0], model.graph.output[0])]
    assert dims == [["batch", 1, "16*rows16", "16*cols16"], ["batch", "16*rows16", "16*cols16"]]
    assert check_onnx(path, net) <= TOLERANCE  # (1, 1, 16, 16) and (3, 1, 64, 48)
    session = onnx_session(path)
    image = torch.randn(2, 1, 80, 32)
    with torch.no_grad():
        expected = VesselProbability(net)(image).numpy()
    got, = session.run([OUTPUT], {INPUT: image.numpy()})
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)
    assert got.dtype == np.float32 and 0 <= got.min() <= got.max() <= 1


def test_a_file_of_other_weights_is_refused(exported, tmp_path):
    _, path = exported
    with pytest.raises(ValueError, match="differ by up to .* do not deploy"):
        check_onnx(path, trained_like(seed=1))


def test_the_command_names_a_missing_model(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.onnx")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "x.onnx").exists()
