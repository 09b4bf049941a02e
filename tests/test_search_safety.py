"""What another user of the machine (or of a bucket) could plant is refused before Ray uses it:
the local Ray's temp folder is this user's alone (mode 0700), and a saved search at a storage URL
is resumed only when the user says it is trusted. No Ray is started here."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from ray import tune

from cmunet.config import load_config
from cmunet.training import ray_local
from cmunet.training.ray_local import (default_temp_dir, private_folder, ray_session,
                                       ray_temp_dir, tighten)
from cmunet.training.search import check_resumable, search
from cmunet.training.tune_config import SearchConfig, TuneConfig


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_the_default_temp_folder_is_per_user_and_private(tmp_path, monkeypatch):
    monkeypatch.setattr(ray_local.tempfile, "gettempdir", lambda: str(tmp_path))
    assert default_temp_dir() == tmp_path / f"ray-cmunet-{os.getuid()}"
    temp = ray_temp_dir(SearchConfig())
    assert temp == tmp_path / f"ray-cmunet-{os.getuid()}" / "ray"  # Ray's folder, inside ours
    assert mode(temp.parent) == 0o700 and temp.parent.stat().st_uid == os.getuid()
    assert ray_temp_dir(SearchConfig()) == temp  # used again as it is


def test_a_temp_folder_others_can_use_or_own_is_refused(tmp_path, monkeypatch):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    os.chmod(shared, 0o777)  # what Ray makes its folders: anyone could have planted files
    with pytest.raises(ValueError, match=r"is open to other users \(mode 777\).*search.temp_dir"):
        private_folder(shared)
    os.chmod(shared, 0o750)
    with pytest.raises(ValueError, match="is open to other users"):
        private_folder(shared)
    os.chmod(shared, 0o700)
    assert private_folder(shared) == shared.resolve()
    link = tmp_path / "link"
    link.symlink_to(shared)
    with pytest.raises(ValueError, match="is a symbolic link"):
        private_folder(link)
    me = os.getuid()
    monkeypatch.setattr(ray_local.os, "getuid", lambda: me + 1)  # as if someone else made it
    with pytest.raises(ValueError, match=f"belongs to another user \\(uid {me}\\)"):
        private_folder(shared)


def test_ray_session_refuses_a_shared_temp_folder_before_starting_ray(tmp_path, monkeypatch):
    import ray

    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # a /tmp-like folder
    monkeypatch.setattr(ray, "init", lambda **kw: pytest.fail("Ray was started"))
    with pytest.raises(ValueError, match="search.temp_dir"):
        with ray_session(SearchConfig(temp_dir=str(shared))):
            pass


def test_the_folders_ray_made_world_writable_are_tightened(tmp_path):
    temp = private_folder(tmp_path / "mine") / "ray"
    session = temp / "session_2025-01-01_00-00-00_000000_1"
    for folder in (temp, session, session / "sockets", session / "logs"):
        folder.mkdir(exist_ok=True)
        os.chmod(folder, 0o777)  # Ray's try_make_directory_shared
    (temp / "session_latest").symlink_to(session)
    tighten(temp)
    assert {mode(f) for f in (temp, session, session / "sockets", session / "logs")} == {0o700}


def test_a_search_at_a_storage_url_is_resumed_only_when_trusted(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="set search.trust_storage=true"):
        check_resumable("s3://bucket/tune/search", trust_storage=False)
    check_resumable("s3://bucket/tune/search", trust_storage=True)  # the user vouches for it
    cfg = load_config(TuneConfig, None, [f"out={tmp_path}", "search.storage=s3://bucket/tune"])
    assert not cfg.search.trust_storage  # refused unless said otherwise
    restored = []
    monkeypatch.setattr(tune.Tuner, "can_restore", classmethod(lambda cls, path: True))
    monkeypatch.setattr(tune.Tuner, "restore", classmethod(lambda cls, *a, **k: restored.append(a)))
    with pytest.raises(ValueError, match="s3://bucket/tune/search holds a saved search"):
        search(cfg, None, [], {}, None, trainable=lambda config: None)
    assert not restored  # refused before Ray read (unpickled) anything
