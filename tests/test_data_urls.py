"""Shards from anywhere: an S3-compatible server (moto), a plain HTTP server and a pipe: command,
all real servers on 127.0.0.1; tools/shard.py --out s3://, then pre-training and fine-tuning
reading from each."""

from __future__ import annotations

import csv
import functools
import json
import os
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from conftest import ROOT, load_tool
from conftest import TINY_PRETRAIN as TINY_MODEL
from cmunet.data import location
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import InMemorySet, ShardStream, load_manifest

BUCKET = "cmunet-test"
TINY_PRETRAIN = [*TINY_MODEL, "train.epochs=1", "train.steps_per_epoch=2", "train.log_every=1",
                 "train.figure_every=100", "data.ratio=50-30"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free port of 127.0.0.1, with a bucket; its settings are put in the
    environment the way a user gives them (AWS_* variables), and removed afterwards."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@pytest.fixture(scope="module")
def s3_shards(s3, tiny_folder) -> str:
    """The tiny folder sharded straight into the bucket by tools/shard.py."""
    url = f"s3://{BUCKET}/tiny"
    shard = load_tool("shard")
    assert shard(["--images", str(tiny_folder / "images"), "--masks",
                  str(tiny_folder / "masks"), "--meta", str(tiny_folder / "meta.csv"),
                  "--out", url, "--size", "64", "--workers", "1", "--shard-size", "2"]) == 0
    return url


@pytest.fixture(scope="module")
def http_shards(tiny_shards):
    """tiny_shards served by http.server on a free port of 127.0.0.1."""
    handler = functools.partial(_QuietHandler, directory=str(tiny_shards.parent))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{tiny_shards.name}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _keys(shards) -> list[str]:
    return pool_keys(load_splits(location.join(shards, "splits.json")), "train")


def _stream_keys(shards, keys) -> list[str]:
    stream = ShardStream(shards, keys, batch_size=4, seed=3, epochs=1, rank=0, world_size=1)
    return [k for batch in stream for k in batch["key"]]


# ---- the set uploaded by tools/shard.py, and every protocol reads the same samples --------------

def test_shard_out_s3_uploads_the_set_and_refuses_to_overwrite(s3, s3_shards, tiny_shards,
                                                               tiny_folder, capsys):
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    names = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET,
                                                            Prefix="tiny/")["Contents"])
    assert names == sorted(f"tiny/{p.name}" for p in tiny_shards.iterdir())
    for name in ("manifest.json", "splits.json", "shard-000000.tar"):  # byte-reproducible
        body = client.get_object(Bucket=BUCKET, Key=f"tiny/{name}")["Body"].read()
        if name == "manifest.json":
            remote, local = json.loads(body), json.loads((tiny_shards / name).read_text())
            assert remote["index"] == local["index"] and remote["mean"] == local["mean"]
        else:
            assert body == (tiny_shards / name).read_bytes(), name
    config = client.get_object(Bucket=BUCKET, Key="tiny/config.yaml")["Body"].read().decode()
    assert f"out: {s3_shards}" in config  # the URL, not the temporary folder
    shard = load_tool("shard")
    args = ["--images", str(tiny_folder / "images"), "--out", s3_shards, "--size", "64",
            "--workers", "1"]
    assert shard(args) == 2 and "already exists" in capsys.readouterr().err
    client.put_object(Bucket=BUCKET, Key="other/notes.txt", Body=b"x")
    assert shard([*args[:3], f"s3://{BUCKET}/other", *args[4:], "--overwrite"]) == 2
    assert "not written by this tool" in capsys.readouterr().err
    assert shard([*args[:3], "http://127.0.0.1:1/x", *args[4:]]) == 2
    assert "read only" in capsys.readouterr().err
    assert shard([*args[:3], "s3://no-such-bucket/x", *args[4:]]) == 2
    assert "uploading to s3://no-such-bucket/x failed" in capsys.readouterr().err


def test_shard_out_s3_overwrite_keeps_user_files_of_an_earlier_set(s3, tiny_shards, tiny_folder,
                                                                   capsys):
    """s3://bucket/set1 is an earlier set (uploaded as the tool does) plus the user's notes.txt
    and a copied manifest in a prefix of their own: --overwrite refuses both, deleting nothing."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    location.upload(tiny_shards, f"s3://{BUCKET}/set1", log=lambda *_: None)
    client.put_object(Bucket=BUCKET, Key="set1/notes.txt", Body=b"mine")
    client.put_object(Bucket=BUCKET, Key="mine/manifest.json",
                      Body=(tiny_shards / "manifest.json").read_bytes())
    client.put_object(Bucket=BUCKET, Key="mine/analysis/results.csv", Body=b"dice\n")

    def keys(prefix):
        return sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET,
                                                               Prefix=prefix)["Contents"])

    before = keys("set1/") + keys("mine/")
    shard = load_tool("shard")
    for prefix, foreign in (("set1", "notes.txt"), ("mine", "analysis/results.csv")):
        assert shard(["--images", str(tiny_folder / "images"), "--out", f"s3://{BUCKET}/{prefix}",
                      "--size", "64", "--workers", "1", "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and f"holds {foreign}, which was not" in err
    assert keys("set1/") + keys("mine/") == before
    assert client.get_object(Bucket=BUCKET, Key="set1/notes.txt")["Body"].read() == b"mine"


def test_shard_out_s3_overwrite_replaces_the_set_manifest_last(s3, tiny_folder, capsys):
    url = f"s3://{BUCKET}/again"
    base = ["--images", str(tiny_folder / "images"), "--meta", str(tiny_folder / "meta.csv"),
            "--out", url, "--size", "64", "--workers", "1"]
    shard = load_tool("shard")
    assert shard([*base, "--shard-size", "2"]) == 0
    assert shard([*base, "--shard-size", "12", "--overwrite"]) == 0  # fewer, larger shards
    assert "removed 10 files of the earlier set" in capsys.readouterr().err
    manifest = load_manifest(url)
    assert [s["name"] for s in manifest["shards"]] == ["shard-000000.tar", "shard-000001.tar"]
    assert manifest["labelled"] == 0  # the new set (no masks), not the old one


def test_every_protocol_streams_the_same_samples(s3_shards, http_shards, tiny_shards):
    keys = _keys(tiny_shards)
    expected = _stream_keys(tiny_shards, keys)
    assert set(expected) == set(keys)  # (and a few wrapped to the start: an epoch is a pass)
    pipe = f"pipe:cat {tiny_shards}/{{name}}"
    for shards in (s3_shards, http_shards, pipe):
        assert load_manifest(shards)["count"] == 24
        assert _stream_keys(shards, keys) == expected, shards
        remote, local = InMemorySet(shards, keys[:5]), InMemorySet(tiny_shards, keys[:5])
        assert all(np.array_equal(a["image"], b["image"]) and np.array_equal(a["mask"], b["mask"])
                   for a, b in zip(remote, local))


def test_missing_sets_and_secrets_in_urls_are_named(s3, http_shards):
    with pytest.raises(FileNotFoundError, match=f"s3://{BUCKET}/nothing/manifest.json does not"):
        load_manifest(f"s3://{BUCKET}/nothing")
    with pytest.raises(FileNotFoundError, match="splits.json does not exist"):
        load_splits(location.join(http_shards + "-missing", "splits.json"))
    with pytest.raises(ValueError, match="holds a password") as err:
        load_manifest("https://user:hunter2@example.org/shards")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ValueError, match=r"needs \{name\}"):
        load_manifest("pipe:cat /tmp/manifest.json")
    assert location.public("https://user:pw@host:8/x") == "https://host:8/x"
    assert location.absolute("s3://b/x") == "s3://b/x"
    assert location.join("s3://b/x/", "manifest.json") == "s3://b/x/manifest.json"


# ---- real jobs ----------------------------------------------------------------------------------

def _run(cmd, cwd):
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result.stdout + result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("where", ["s3", "http"])
def test_pretraining_and_fine_tuning_read_shards_from_a_server(where, request, tmp_path):
    """A tiny pre-training (plain python, 1 rank, 2 steps) and a tiny fine-tuning, both reading
    their shards from the server; the fine-tuning starts from the pre-training's export."""
    from cmunet.config import load_config
    from cmunet.training.finetune import FinetuneConfig, run_finetune

    shards = request.getfixturevalue(f"{where}_shards")
    _run([sys.executable, str(ROOT / "launch/pretrain.py"), *TINY_PRETRAIN,
          f"data.shards={shards}", "out=PT", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"],
         cwd=tmp_path)
    with (tmp_path / "PT" / "log.csv").open() as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2]
    export = tmp_path / "PT" / "export"
    assert json.loads((export / "manifest.json").read_text())["count"] == 24
    cfg = load_config(FinetuneConfig, ROOT / "configs/finetune/cpu.yaml",
                      [f"data.shards={shards}", f"init={export}", f"out={tmp_path / 'FT'}",
                       "train.epochs=1", "train.batch_size=4", "data.ratio=50-30",
                       f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    run_finetune(cfg, log=lambda m: None)
    assert (tmp_path / "FT" / "best.safetensors").exists()
    preprocessing = json.loads((tmp_path / "FT" / "preprocessing.json").read_text())
    assert preprocessing["size"] == 64
