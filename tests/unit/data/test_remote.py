"""Shard sets read from real servers started here: Python's http.server for http(s) URLs and moto's S3 server
for s3:// URLs (andy_dist.data.remote, shard_cache, prefetch). Every case compares with the same set read from
local disk, or checks the one-line error and that nothing half-downloaded stays in the cache."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from andy_dist import UserError
from andy_dist.data.batch_plan import EpochOrder
from andy_dist.data.remote import FetchPolicy
from andy_dist.data.shard_cache import DataAccess
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.shard_writer import write_shards
from andy_dist.data.stream import TrainStream
from tests.launching import ROOT, cpu_env
from tests.servers import FileServer, S3Server, without_aws_credentials
from tests.unit.data.shard_io import all_samples

QUICK = FetchPolicy(retries=3, backoff_s=0.2)


@pytest.fixture(scope="module")
def many_shards(builtin_corpus, tokenizer_path, tmp_path_factory) -> Path:
    """The built-in corpus in small shards (about 50 kB each): enough shards to prefetch and evict."""
    out = tmp_path_factory.mktemp("remote") / "stdlib"
    write_shards([str(builtin_corpus)], tokenizer_path, out, val_fraction=0.05, shard_size_mb=0.05, workers=1,
                 max_seq_len=64, progress=False)
    return out


@pytest.fixture
def server(many_shards):
    with FileServer(many_shards) as running:
        yield running


def access(tmp_path, **extra) -> DataAccess:
    return DataAccess(cache_dir=tmp_path / "cache", policy=QUICK, **extra)


def shard_names(shards) -> list[str]:
    return [s.name for s in shards.train + shards.val]


def fetch_log(shards) -> list[dict]:
    path = shards.files.cache.meta / "fetch.log"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_http_set_reads_the_same_samples_as_the_local_copy_and_is_fetched_once_per_node(
        many_shards, server, tokenizer_path, tmp_path):
    local = open_shards(many_shards, tokenizer=tokenizer_path, verify="size")
    remote = open_shards(f"{server.url}/", tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    assert remote.location == server.url and len(remote.train) > 8
    for split in ("train", "val"):
        assert all(np.array_equal(a, b) for a, b in zip(all_samples(local, split), all_samples(remote, split)))
    assert all(server.count(name) == 1 for name in shard_names(remote))
    # A second process on the node (a fresh ShardFiles) trusts the verified copies: no shard is fetched again.
    again = open_shards(server.url, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    all_samples(again, "train")
    assert all(server.count(name) == 1 for name in shard_names(again))
    assert server.count("manifest.json") == 2  # the manifest is read at every start
    # data_verify=full re-reads every cached copy and decodes it, without downloading anything.
    open_shards(server.url, tokenizer=tokenizer_path, verify="full", access=access(tmp_path))
    assert all(server.count(name) == 1 for name in shard_names(again))


def test_s3_set_through_an_s3_compatible_server(many_shards, tokenizer_path, tmp_path, monkeypatch):
    for key, value in without_aws_credentials().items():
        monkeypatch.setenv(key, value)
    for key in [k for k in __import__("os").environ if k.startswith("AWS_ACCESS") or k.startswith("AWS_SECRET")]:
        monkeypatch.delenv(key)
    with S3Server() as s3:
        url = s3.upload(many_shards, "corpora", "andy/stdlib")
        remote = open_shards(url, tokenizer=tokenizer_path, verify="once",
                             access=access(tmp_path, storage_options=s3.storage_options))
        local = open_shards(many_shards, tokenizer=tokenizer_path, verify="size")
        assert all(np.array_equal(a, b) for a, b in zip(all_samples(local, "train"), all_samples(remote, "train")))
        # The same bucket without credentials: one line naming the file and the fix, no retries.
        started = time.monotonic()
        options = {"endpoint_url": s3.endpoint, "client_kwargs": {"region_name": s3.REGION}}
        with pytest.raises(UserError) as error:
            open_shards(url, verify="once", access=access(tmp_path / "other", storage_options=options))
        assert f"no credentials to read {url}/manifest.json" in str(error.value)
        assert "AWS_ACCESS_KEY_ID" in str(error.value) and "\n" not in str(error.value)
        assert time.monotonic() - started < 5


def test_a_missing_or_forbidden_shard_is_named_at_once(many_shards, server, tokenizer_path, tmp_path):
    shards = open_shards(server.url, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    victim = shards.train[3].name
    server.missing.add(victim)
    with pytest.raises(UserError) as error:
        shards.files.ensure(victim, shards.train[3].sha256, shards.train[3].bytes)
    assert str(error.value).startswith(f"{server.url}/{victim} does not exist (not found on the server)")
    assert server.count(victim) == 1  # a 404 is not retried
    assert not shards.files.cached(victim)
    refused = shards.train[4]
    server.forbidden.add(refused.name)
    with pytest.raises(UserError, match=f"access to {server.url}/{refused.name} was refused"):
        shards.files.ensure(refused.name, refused.sha256, refused.bytes)
    assert server.count(refused.name) == 1  # nor is a 403


def test_a_cut_transfer_is_retried_and_never_becomes_a_cached_shard(many_shards, server, tokenizer_path, tmp_path):
    shards = open_shards(server.url, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    first, second = shards.train[0], shards.train[1]
    server.cut[first.name] = 2  # two cut transfers, then a whole one
    path = shards.files.ensure(first.name, first.sha256, first.bytes)
    assert server.count(first.name) == 3 and path.read_bytes() == (many_shards / first.name).read_bytes()
    server.cut[second.name] = 10  # every attempt cut: give up with one line, and leave nothing behind
    with pytest.raises(UserError) as error:
        shards.files.ensure(second.name, second.sha256, second.bytes)
    message = str(error.value)
    assert message.startswith(f"cannot fetch {server.url}/{second.name}:") and "after 3 attempts" in message
    assert server.count(second.name) == 3
    leftovers = [p.name for p in shards.dir.iterdir() if second.name in p.name]
    assert leftovers == [], leftovers


def test_a_damaged_cached_shard_is_fetched_again(many_shards, server, tokenizer_path, tmp_path, capfd):
    shards = open_shards(server.url, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    expected = all_samples(shards, "train")
    victim = shards.train[2]
    with open(shards.files.path(victim.name), "r+b") as handle:  # a stray write into the cached copy
        handle.seek(victim.block_offsets[-1] + 700)
        handle.write(b"\xff" * 64)
    again = open_shards(server.url, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    assert all(np.array_equal(a, b) for a, b in zip(expected, all_samples(again, "train")))
    assert server.count(victim.name) == 2
    assert f"the cached copy {shards.files.path(victim.name)} of {server.url}/{victim.name} is damaged" in \
        capfd.readouterr().err


def test_local_shards_are_hashed_once_per_node_before_their_first_read(many_shards, tokenizer_path, tmp_path):
    """data_verify=once on a local folder: opening reads no shard; each shard is hashed before its first
    read and remembered on the node; a shard changed afterwards (same size) is hashed again and named."""
    data = tmp_path / "set"
    shutil.copytree(many_shards, data)
    shards = open_shards(data, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    records = shards.files.cache.meta / "verified"
    assert not any(records.glob("*.tar.json"))  # start-up hashed nothing
    all_samples(shards, "train")
    assert {p.name for p in records.glob("*.tar.json")} == {f"{s.name}.json" for s in shards.train}
    victim = data / shards.train[1].name
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    victim.write_bytes(bytes(raw))
    again = open_shards(data, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
    with pytest.raises(UserError) as error:
        all_samples(again, "train")
    assert str(error.value).startswith(f"shard {victim} is corrupt: its sha256 ")


def test_a_server_gone_mid_epoch_ends_in_one_line_after_retries(many_shards, tokenizer_path, tmp_path):
    with FileServer(many_shards) as server:
        shards = open_shards(server.url, tokenizer=tokenizer_path, verify="once", access=access(tmp_path))
        stream = TrainStream(shards, rank=0, world_size=1, micro_batch_size=8, seed=3, max_seq_len=64)
        steps = stream.iter_epoch()
        next(steps), next(steps)
        for name in shard_names(shards):  # a small cache: nothing the next steps read is held any more
            shards.files.evict(name)
    started = time.monotonic()
    with pytest.raises(UserError) as error:
        next(steps)
    message = str(error.value)
    assert message.startswith(f"cannot fetch {server.url}/train-") and "after 3 attempts" in message, message
    assert "check that the server is up" in message and "\n" not in message
    assert time.monotonic() - started >= sum(QUICK.waits())


_FETCH_EVERY_SHARD = """
import json, sys, time
from pathlib import Path
from andy_dist.data.remote import FetchPolicy
from andy_dist.data.shard_cache import DataAccess, ShardFiles
url, cache, go, out = sys.argv[1:5]
files = ShardFiles(url, DataAccess(cache_dir=cache, policy=FetchPolicy(3, 0.2)))
manifest = files.manifest()
Path(out + ".ready").touch()
while not Path(go).exists():
    time.sleep(0.002)
sizes = {}
for split in ("train", "val"):
    for shard in manifest["splits"][split]["shards"]:
        sizes[shard["file"]] = files.ensure(shard["file"], shard["sha256"], shard["bytes"]).stat().st_size
Path(out).write_text(json.dumps(sizes))
"""


def test_one_process_per_node_downloads_a_shard_the_others_wait(many_shards, server, tmp_path):
    """Two processes sharing a cache folder ask for every shard at the same moment: each shard crosses the
    network once, and both processes end up with complete copies."""
    go, outs = tmp_path / "go", [tmp_path / f"sizes{i}.json" for i in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _FETCH_EVERY_SHARD, server.url, str(tmp_path / "cache"),
                               str(go), str(out)], cwd=ROOT, env=cpu_env()) for out in outs]
    try:
        _wait_until(lambda: all(Path(f"{out}.ready").exists() for out in outs))
        go.touch()
        assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    finally:
        for proc in procs:
            proc.kill()
    manifest = json.loads((many_shards / "manifest.json").read_text())
    names = [s["file"] for split in ("train", "val") for s in manifest["splits"][split]["shards"]]
    assert [server.count(name) for name in names] == [1] * len(names)
    sizes = [json.loads(out.read_text()) for out in outs]
    assert sizes[0] == sizes[1] == {name: (many_shards / name).stat().st_size for name in names}


def _wait_until(condition, timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_prefetch_runs_ahead_of_the_read_position_and_evicts_passed_shards(many_shards, server, tokenizer_path,
                                                                          tmp_path):
    """Told the epoch order, the prefetcher fetches the shards read first before anything reads them; over
    the limit it deletes shards the epoch has passed, and never one it still reads."""
    limit = 4 * 72_000
    shards = open_shards(server.url, tokenizer=tokenizer_path, verify="once",
                         access=access(tmp_path, prefetch=True, prefetch_shards=2, max_bytes=limit))
    index = shards.block_index("train")
    order = EpochOrder(index.sizes, seed=5)(0)
    from andy_dist.data.prefetch import shard_use

    first, last = shard_use(order, index.first_sample, index.shard_of_block, len(shards.train))
    by_first_use = [shards.train[i].name for i in np.argsort(first, kind="stable")]
    advance = shards.follow_epoch(order, 0, margin=0)
    advance(0)
    _wait_until(lambda: all(shards.files.cached(name) for name in by_first_use[:2]))
    assert [e["file"] for e in fetch_log(shards) if e["event"] == "prefetch"][:2] == by_first_use[:2]
    # Readers fetch every shard on demand, past the limit. Far into the epoch, the prefetcher deletes the
    # shards whose last use lies behind the position (the limit cannot hold without more): exactly those.
    for shard in shards.train:
        shards.files.ensure(shard.name, shard.sha256, shard.bytes)
    position = int(np.sort(last)[len(last) // 2]) + 1
    passed = {s.name for s, end in zip(shards.train, last) if end < position}
    advance(position)
    _wait_until(lambda: {e["file"] for e in fetch_log(shards) if e["event"] == "evict"} == passed)
    time.sleep(0.5)
    assert [s.name for s in shards.train if not shards.files.cached(s.name)] == sorted(passed)
    shards.close()


def test_an_epoch_through_a_small_cache_equals_the_local_epoch(many_shards, server, tokenizer_path, tmp_path):
    """Training order and tokens are the same over HTTP with prefetching, a cache of a few shards and two
    DataLoader workers as from local disk, while passed shards were evicted on the way."""
    local = open_shards(many_shards, tokenizer=tokenizer_path, verify="size")
    remote = open_shards(server.url, tokenizer=tokenizer_path, verify="once",
                         access=access(tmp_path, prefetch=True, prefetch_shards=2, max_bytes=4 * 72_000))

    def epoch(shards, workers):
        stream = TrainStream(shards, rank=0, world_size=2, micro_batch_size=16, seed=9, num_workers=workers,
                             max_seq_len=64)
        return [(step.sample_ids.tolist(), [mb.input_ids.tolist() for mb in step.micro_batches])
                for step in stream.iter_epoch()]

    assert epoch(remote, 2) == epoch(local, 0)
    remote.close()
    events = [e["event"] for e in fetch_log(remote)]
    assert "evict" in events and "prefetch" in events
    shutil.rmtree(tmp_path / "cache")
