"""Logging (rank 0 shows INFO as plain lines, other ranks WARNING) and progress bars that turn
themselves off outside a terminal."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tqdm import tqdm

from cmunet.log import ROOT, bar_disable, logger, setup_logging


@pytest.fixture
def restore_level():
    level = logging.getLogger(ROOT).level
    yield
    logging.getLogger(ROOT).setLevel(level)


def test_rank_0_prints_plain_lines_other_ranks_only_warnings(capsys, restore_level):
    log = logger("cmunet.test")
    setup_logging(rank=0)
    log.info("epoch 1: loss 0.5")
    log.debug("hidden")
    assert capsys.readouterr().out == "epoch 1: loss 0.5\n"  # exactly what print wrote
    setup_logging(rank=3)
    log.info("not on rank 3")
    log.warning("warning: shown on every rank")
    assert capsys.readouterr().out == "warning: shown on every rank\n"
    setup_logging(rank=0, level="DEBUG")
    log.debug("now shown")
    assert capsys.readouterr().out == "now shown\n"
    with pytest.raises(ValueError, match="log level"):
        setup_logging(rank=0, level="LOUD")


def test_rank_comes_from_the_launcher_environment():
    code = ("from cmunet.log import logger; log = logger('x'); log.info('info'); "
            "log.warning('warn'); import logging; print(len(logging.getLogger('cmunet').handlers))")
    for rank, expected in (("0", "info\nwarn\n1\n"), ("2", "warn\n1\n")):
        env = {**os.environ, "RANK": rank}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        assert out == expected, (rank, out)


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bars_are_off_outside_a_terminal_and_off_the_main_rank():
    assert tqdm(range(3), file=io.StringIO(), disable=bar_disable(True)).disable
    assert not tqdm(range(3), file=Terminal(), disable=bar_disable(True)).disable
    assert tqdm(range(3), file=Terminal(), disable=bar_disable(False)).disable


def test_segmentation_draws_no_bar_into_a_captured_stderr(tmp_path, capsys):
    from cmunet.inference.model import load_model
    from cmunet.inference.predict import SegmentOptions
    from cmunet.inference.segment import run_segment
    from test_package import tiny_model

    model = load_model(str(tiny_model(tmp_path / "model")), precision="fp32")
    (tmp_path / "in").mkdir()
    image = np.random.default_rng(0).integers(0, 255, (32, 32), dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "in/a.png")
    capsys.readouterr()
    report = run_segment(model, tmp_path / "in", tmp_path / "seg", SegmentOptions(), None,
                         progress=True)
    assert report.exit_code == 0
    assert "segment" not in capsys.readouterr().err  # stderr is not a terminal under pytest
