"""A search whose winner sits on an edge of its grid is warned about (the optimum may lie beyond
the grid), and the study counts such cells. The real search's record of it is checked by
``tests/test_tune.py``'s end-to-end test."""

from __future__ import annotations

import json
from pathlib import Path

from cmunet.study import collect, table
from cmunet.study_config import StudyConfig
from cmunet.study_stats import UNKNOWN, grid_edge_line
from cmunet.training.tune_config import SearchConfig
from cmunet.training.tune_results import edge_labels, edge_of_grid


def test_a_winner_at_the_top_of_the_grid_is_warned_about():
    [message] = edge_of_grid({"lr": 1e-3, "batch_size": 8},
                             SearchConfig(lr=[1e-3, 1e-4], batch_size=[8]))
    assert message == ("lr=0.001 (top of [0.0001, 0.001]): the optimum may lie beyond the grid; "
                       "widen search.lr beyond it")
    assert edge_labels([message]) == "lr=0.001 (top of [0.0001, 0.001])"


def test_a_winner_at_the_bottom_of_the_grid_is_warned_about():
    [message] = edge_of_grid({"lr": 1e-3, "batch_size": 16},
                             SearchConfig(lr=[1e-2, 1e-3, 1e-4], batch_size=[16, 32]))
    assert message.startswith("batch_size=16 (bottom of [16, 32]): ")  # lr is interior
    assert message.endswith("widen search.batch_size beyond it")
    search = SearchConfig(lr=[1e-2, 1e-3, 1e-4], batch_size=[8])
    assert edge_labels(edge_of_grid({"lr": 1e-4, "batch_size": 8}, search)) == \
        "lr=0.0001 (bottom of [0.0001, 0.001, 0.01])"


def test_an_interior_winner_and_a_single_value_are_not_warned_about():
    search = SearchConfig(lr=[1e-2, 1e-3, 1e-4], batch_size=[8])
    assert edge_of_grid({"lr": 1e-3, "batch_size": 8}, search) == []
    # one value (or the same value twice) is not searched: its winner is no edge
    assert edge_of_grid({"lr": 1e-3, "batch_size": 8},
                        SearchConfig(lr=[1e-3], batch_size=[8, 8])) == []
    assert edge_labels([]) == ""


def test_the_edges_are_those_of_the_sorted_values_not_of_the_list():
    search = SearchConfig(lr=[1e-3, 1e-5, 1e-4], batch_size=[32, 8, 16])
    edges = edge_of_grid({"lr": 1e-3, "batch_size": 8}, search)  # first in lr's list: its top
    assert edge_labels(edges) == ("lr=0.001 (top of [1e-05, 0.0001, 0.001]); "
                                  "batch_size=8 (bottom of [8, 16, 32])")
    assert edge_of_grid({"lr": 1e-4, "batch_size": 16}, search) == []  # last in the lists
    # random mode: a drawn lr inside the range is not at an edge; batch_size is still a list
    random = SearchConfig(lr=[1e-4, 1e-2], batch_size=[8, 16], mode="random")
    assert edge_labels(edge_of_grid({"lr": 5e-4, "batch_size": 16}, random)) == \
        "batch_size=16 (top of [8, 16])"


def finished_cell(out: Path, name: str, result: dict) -> None:
    """The files :func:`collect` reads from a finished cell of arm ``none``."""
    folder = out / "cells" / name
    (folder / "test").mkdir(parents=True)
    (folder / "model").mkdir()
    (folder / "test" / "metrics.json").write_text(json.dumps({"dice": {"mean": 0.5},
                                                              "n_images": 3}))
    (folder / "model" / "result.json").write_text(json.dumps({"width": 4, "train_keys": ["a"]}))
    (folder / "result.json").write_text(json.dumps(
        {"best": {"cv_dice": 0.5, "lr": 1e-3, "batch_size": 8}, "epochs": 1, **result}))


def test_the_study_counts_the_cells_whose_winner_sat_on_an_edge(tmp_path):
    top = edge_of_grid({"lr": 1e-3, "batch_size": 8}, SearchConfig(lr=[1e-3, 1e-4], batch_size=[8]))
    finished_cell(tmp_path, "none-ball-s0", {"grid_edge": top})
    finished_cell(tmp_path, "none-ball-s1", {"grid_edge": top})
    finished_cell(tmp_path, "none-ball-s2", {"grid_edge": []})
    finished_cell(tmp_path, "none-ball-s3", {})  # searched before grid_edge was recorded
    cfg = StudyConfig(out=str(tmp_path), arms=["none"], budgets=["all"], seeds=[0, 1, 2, 3])
    rows = collect(cfg, tmp_path)
    assert [r["grid_edge"] for r in rows] == [edge_labels(top)] * 2 + ["", UNKNOWN]
    line = ("Grid edges: the search's winner sat on an edge of its grid in 2 of 3 cells (1 more "
            "unknown: searched before this was recorded); `lr=0.001 (top of [0.0001, 0.001])` in "
            "2. The optimum may lie beyond the grid: widen it (docs/tuning.md).")
    assert line in table(cfg, rows).splitlines()
    # the rows of an older results.csv, without the column: unknown, not "on no edge"
    old = [{k: v for k, v in r.items() if k != "grid_edge"} for r in rows]
    assert grid_edge_line(old) == ("Grid edges: the search's winner sat on an edge of its grid "
                                   "in 0 of 0 cells (4 more unknown: searched before this was "
                                   "recorded).")
    assert grid_edge_line(rows[2:3]).endswith("in 0 of 1 cells.")
