from dataclasses import dataclass, field
from typing import Literal

import pytest

from cmunet.config import ConfigError, check, flatten, load_config, save_config


@dataclass
class Train:
    epochs: int = 10
    lr: float = 1e-3
    amp: bool = True
    betas: tuple[float, float] = (0.9, 0.95)

    def __post_init__(self):
        check(self.epochs > 0, "epochs", "must be positive")


@dataclass
class Tracking:
    experiment: str = "default"
    register_as: str = ""


@dataclass
class Job:
    name: str = "run"
    method: Literal["cmunet", "mae"] = "cmunet"
    init: str | None = None
    ratios: list[str] = field(default_factory=lambda: ["79-1"])
    train: Train = field(default_factory=Train)
    tracking: Tracking = field(default_factory=lambda: Tracking("jobs", "job-model"))


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_yaml_then_overrides(tmp_path):
    path = write(tmp_path, "name: a\ntrain:\n  epochs: 3\n  lr: 1e-4\n")
    cfg = load_config(Job, path, ["train.epochs=5", "name=007", "init=null", "train.betas=[0.5, 0.6]"])
    assert cfg.train.epochs == 5 and cfg.train.lr == 1e-4  # "1e-4" is a string in YAML 1.1
    assert cfg.name == "007"  # a string field keeps the text as typed
    assert cfg.init is None and cfg.train.betas == (0.5, 0.6) and cfg.train.amp is True


@pytest.mark.parametrize("overrides, fragment", [
    (["train.epoch=2"], "unknown config key 'train.epoch'; did you mean 'train.epochs'?"),
    (["trian.epochs=2"], "unknown config key 'trian'"),
    (["train.epochs=two"], "'train.epochs' = 'two' has the wrong type: expected int"),
    (["train.epochs=2.5"], "'train.epochs'"),
    (["train.amp=1"], "'train.amp'"),
    (["method=simclr"], "'method' = 'simclr' is not one of 'cmunet', 'mae'"),
    (["train.epochs=0"], "'train.epochs' must be positive"),
    (["train=3"], "'train' must be a mapping"),
    (["noequals"], "not of the form key=value"),
])
def test_bad_keys_and_types_are_refused(overrides, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(Job, None, overrides)
    assert fragment in str(err.value)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = write(tmp_path, "train:\n  warmup: 3\n")
    with pytest.raises(ConfigError, match=r"'train.warmup'.*in .*c.yaml"):
        load_config(Job, path)


def test_a_bad_override_is_blamed_on_the_command_line_not_the_file(tmp_path):
    path = write(tmp_path, "train:\n  epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(Job, path, ["train.epochs=two"])
    assert "in the command-line overrides" in str(err.value) and "c.yaml" not in str(err.value)
    bad = write(tmp_path, "train:\n  epochs: two\n")
    with pytest.raises(ConfigError, match=r"in .*c.yaml"):
        load_config(Job, bad, ["name=x"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(Job, None, ["train.epochs=7", "ratios=[50-30, 79-1]"])
    path = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Job, path) == cfg
    assert flatten(cfg)["train.epochs"] == 7 and flatten(cfg)["ratios"] == ["50-30", "79-1"]


def test_partial_section_keeps_the_parents_defaults(tmp_path):
    cfg = load_config(Job, write(tmp_path, "tracking:\n  experiment: mine\n"))
    assert cfg.tracking == Tracking("mine", "job-model")
    assert load_config(Job, None, ["train.lr=0.5"]).train.epochs == 10
