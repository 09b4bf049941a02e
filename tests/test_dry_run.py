"""``--dry-run`` of pre-training refuses views larger than the shards' images, in one line."""

from __future__ import annotations

import pytest

from cmunet.config import load_config
from cmunet.training.dry_run import pretrain_plan
from cmunet.training.pretrain_config import PretrainConfig


def _plan(tiny_shards, tmp_path, *overrides):
    return pretrain_plan(load_config(PretrainConfig, None, [
        f"data.shards={tiny_shards}", f"out={tmp_path / 'OUT'}", "data.ratio=50-30",
        *overrides]))


@pytest.mark.parametrize("args, refused", [
    (["method=mae", "view_size=4096"], "view_size 4096 px is larger than the 64-px images"),
    (["method=mae", "view_size=80"], "view_size 80 px is larger"),
    (["method=cmunet", "view_size=64"], "view_size 64 + cmunet.shift 9 = 73 px is larger"),
    (["method=cmunet", "view_size=48", "cmunet.shift=20"], "cmunet.shift 20 = 68 px"),
    (["method=cmunet-rec", "view_size=48"], ""),  # 48 + 7 fits
    (["method=mae", "view_size=64"], ""),
    (["method=none", "view_size=4096"], ""),  # no views
])
def test_dry_run_refuses_views_larger_than_the_images(tiny_shards, tmp_path, args, refused):
    if not refused:
        assert _plan(tiny_shards, tmp_path, *args)["pool_images"] > 0
        return
    with pytest.raises(ValueError) as err:
        _plan(tiny_shards, tmp_path, *args)
    assert refused in str(err.value) and str(tiny_shards) in str(err.value)
    assert "\n" not in str(err.value)
