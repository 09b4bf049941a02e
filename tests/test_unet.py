import pytest
import torch

from cmunet.models.unet import UNet, count_parameters


def test_width_64_has_the_papers_31_04_million_parameters():
    assert round(count_parameters(UNet(64, 1, 2)) / 1e6, 2) == 31.04


def test_output_shape_and_size_check():
    net = UNet(8, 1, 2)
    assert net(torch.randn(2, 1, 64, 48)).shape == (2, 2, 64, 48)
    with pytest.raises(ValueError, match="multiples of 16"):
        net(torch.randn(1, 1, 60, 64))
