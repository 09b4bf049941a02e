"""Reads from a URL are bounded (data.remote): a server that accepts and never answers, a
truncated shard and a missing object each end in one line naming the URL, within the time-outs.
Real servers on 127.0.0.1 (a silent TCP socket, http.server, moto's S3)."""

from __future__ import annotations

import contextlib
import functools
import shutil
import socket
import sys
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import ROOT, load_tool
from test_data_urls import BUCKET, s3  # noqa: F401 (the moto server fixture)
from cmunet.data import location
from cmunet.data.location import MissingFile, ReadError, RemoteConfig
from cmunet.data.splits import load_splits, pool_keys
from cmunet.data.stream import InMemorySet, ShardStream, load_manifest, make_loader

FAST = RemoteConfig(connect_timeout_s=1, read_timeout_s=1, retries=1)
BOUND = 2 * 1 + 0.5 + 3  # two tries of 1 s, 0.5 s apart, and slack for a loaded machine


@pytest.fixture
def fast():
    """Time-outs of 1 s and one retry for the test; the defaults again afterwards."""
    location.configure(FAST)
    try:
        yield FAST
    finally:
        location.configure(RemoteConfig())


@contextlib.contextmanager
def silent_server():
    """A TCP server on a free port of 127.0.0.1 that accepts connections and never answers."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    held, stop = [], threading.Event()

    def accept():
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for connection in held:
            connection.close()
        server.close()


class _Handler(SimpleHTTPRequestHandler):
    """Files of a folder; the tar shards as ``server.tars`` says: "serve", "hang" (never
    answered), or "short" (the full Content-Length announced, half the bytes sent)."""

    def do_GET(self):
        if self.path.endswith(".tar") and self.server.tars == "hang":
            self.server.release.wait()
            return
        if self.path.endswith(".tar") and self.server.tars == "short":
            body = (self.server.folder / self.path.rsplit("/", 1)[-1]).read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[:len(body) // 2])
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@contextlib.contextmanager
def http_server(folder, tars="serve"):
    """``folder`` served on a free port of 127.0.0.1; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 functools.partial(_Handler, directory=str(folder.parent)))
    server.tars, server.folder, server.release = tars, folder, threading.Event()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/{folder.name}"
    finally:
        server.release.set()
        server.shutdown()
        server.server_close()
        thread.join()


def one_line(err: BaseException, *parts: str) -> str:
    text = str(err)
    assert "\n" not in text and all(p in text for p in parts), text
    return text


def test_a_server_that_never_answers_fails_each_protocol_in_one_line(fast, s3, monkeypatch):
    """http(s), s3 (the endpoint silent) and pipe: all give up after two tries of 1 s."""
    import s3fs

    with silent_server() as port:
        for url, cause in ((f"http://127.0.0.1:{port}/set", "no answer within 1 s"),
                           ("pipe:sleep 30; cat {name}", "wrote nothing for 1 s")):
            start = time.monotonic()
            with pytest.raises(ReadError) as err:
                load_manifest(url)
            assert time.monotonic() - start < BOUND, url
            one_line(err.value, location.join(url, "manifest.json"), "timed out", cause,
                     "(2 tries)")
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
        s3fs.S3FileSystem.clear_instance_cache()  # a client for the silent endpoint
        try:
            start = time.monotonic()
            with pytest.raises(ReadError) as err:
                load_manifest(f"s3://{BUCKET}/set")
            assert time.monotonic() - start < 2 * BOUND
            one_line(err.value, f"s3://{BUCKET}/set/manifest.json", "timed out")
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


def test_shards_that_never_come_end_pretraining_stream_and_fine_tuning(fast, tiny_shards,
                                                                       tmp_path, capsys):
    """The manifest and splits are served, the tars never: the pre-training stream (in a loader
    worker) and the fine-tuning job stop with one line naming the shard."""
    keys = pool_keys(load_splits(tiny_shards / "splits.json"), "train")
    with http_server(tiny_shards, tars="hang") as url:
        stream = ShardStream(url, keys, batch_size=4, epochs=1, rank=0, world_size=1)
        start = time.monotonic()
        with pytest.raises(ReadError) as err:
            next(iter(make_loader(stream, num_workers=1)))
        assert time.monotonic() - start < BOUND + 5  # + the worker's start
        one_line(err.value, f"{url}/shard-", ".tar: timed out: no answer within 1 s")

        finetune = load_tool("finetune")
        start = time.monotonic()
        assert finetune(["--config", str(ROOT / "configs/finetune/cpu.yaml"),
                         f"data.shards={url}", "init=none", f"out={tmp_path / 'FT'}",
                         "data.ratio=50-30", "train.epochs=1", "tracking.enabled=false",
                         "data.remote.connect_timeout_s=1", "data.remote.read_timeout_s=1",
                         "data.remote.retries=0"]) == 2
        assert time.monotonic() - start < BOUND
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {url}/shard-"), lines
    assert "timed out: no answer within 1 s" in lines[0]


def test_a_truncated_shard_over_http_is_one_line_naming_it(fast, tiny_shards, tmp_path):
    """A shard cut short on the server (a damaged tar), and one whose connection ends before
    the announced length (retried, then given up)."""
    folder = tmp_path / "cut"
    shutil.copytree(tiny_shards, folder)
    tar = folder / "shard-000000.tar"
    tar.write_bytes(tar.read_bytes()[:tar.stat().st_size // 3])
    keys = [s["key"] for s in load_manifest(folder)["samples"] if s["shard"] == tar.name]
    with http_server(folder) as url:
        with pytest.raises(ReadError) as err:
            InMemorySet(url, keys)
        one_line(err.value, f"{url}/shard-000000.tar: not a whole tar file", "truncated")
    with http_server(tiny_shards, tars="short") as url:
        with pytest.raises(ReadError) as err:
            InMemorySet(url, keys)
        one_line(err.value, f"{url}/shard-000000.tar: the connection ended after",
                 f"of {(tiny_shards / tar.name).stat().st_size} bytes",
                 "(2 tries)")


def test_a_missing_s3_object_is_one_line_naming_it(fast, s3, tiny_shards):
    """The manifest lists shards the bucket lacks: not found, at once (not retried)."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3["AWS_ENDPOINT_URL"])
    for name in ("manifest.json", "index.npz", "splits.json"):
        client.put_object(Bucket=BUCKET, Key=f"holes/{name}",
                          Body=(tiny_shards / name).read_bytes())
    url = f"s3://{BUCKET}/holes"
    keys = pool_keys(load_splits(location.join(url, "splits.json")), "train")
    with pytest.raises(MissingFile) as err:
        InMemorySet(url, keys)
    one_line(err.value, f"{url}/shard-0000", ".tar: not found")
    assert isinstance(err.value, FileNotFoundError) and "tries" not in str(err.value)
    with pytest.raises(MissingFile, match=r"holes/shard-\d+\.tar: not found"):
        list(ShardStream(url, keys, batch_size=4, epochs=1, rank=0, world_size=1))


def test_remote_settings_are_typed_config(tmp_path):
    from cmunet.config import ConfigError, load_config
    from cmunet.training.finetune import FinetuneConfig
    from cmunet.training.pretrain_config import PretrainConfig

    cfg = load_config(PretrainConfig, None, ["data.remote.read_timeout_s=5",
                                             "data.remote.retries=0"])
    assert cfg.data.remote == RemoteConfig(connect_timeout_s=30, read_timeout_s=5, retries=0)
    with pytest.raises(ConfigError, match="data.remote.connect_timeout_s"):
        load_config(FinetuneConfig, None, ["data.remote.connect_timeout_s=0"])
    assert sys.modules["cmunet.data.location"].remote_config() == RemoteConfig()
