"""The data stream on 2 real ranks (torchrun, gloo) with 2 real DataLoader workers each, on 3 uneven shards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

from andy_dist.data.corpus import read_documents
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.shard_writer import write_shards

pytestmark = pytest.mark.dist
STOP = 9


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def run(tmp_path_factory, builtin_corpus, tokenizer, root):
    tmp = tmp_path_factory.mktemp("dist_data")
    texts = [p for d in read_documents([str(builtin_corpus)]) for p in d.text.split("\n\n")][:1500]
    src = tmp / "paragraphs.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    shard_dir = tmp / "shards"
    write_shards([src], tokenizer, shard_dir, val_fraction=0.1, shard_size_mb=0.25, workers=1, max_seq_len=128,
                 block_tokens=1024, progress=False)
    shards = open_shards(shard_dir)
    assert len(shards.train) == 3 and len({s.samples for s in shards.train}) == 3, shards
    out = tmp / "out"
    out.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(root / "tests/dist/scripts/data_stream.py"), str(shard_dir),
           str(out), str(STOP)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    return shards, ranks


def test_every_sample_once_and_no_sample_in_two_readers(run):
    shards, ranks = run
    readers: dict[tuple[int, int], list[int]] = {}
    for r in ranks:
        for step in r["full"]:
            for ids, worker in zip(step["ids"], step["workers"]):
                readers.setdefault((r["rank"], worker), []).extend(ids)
    assert set(readers) == {(0, 0), (0, 1), (1, 0), (1, 1)}  # 2 ranks x 2 worker processes all read
    everything = [i for ids in readers.values() for i in ids]
    g = 2 * 2 * 2
    n = shards.num_samples("train")
    assert len(everything) == len(set(everything)) == (n // g) * g
    assert n - len(everything) < g


def test_equal_counts_and_the_same_global_batches(run):
    _, (a, b) = run
    assert len(a["full"]) == len(b["full"]) == a["steps_per_epoch"] == b["steps_per_epoch"]
    assert all(len(s["ids"]) == 2 for r in (a, b) for s in r["full"])
    for sa, sb in zip(a["full"], b["full"]):
        assert sa["global"] == sb["global"] and sa["global_targets"] == sb["global_targets"]
        # The all-reduced target count of the rank's micro-batches is the planned global count.
    assert a["reduced"] == b["reduced"] == [s["global_targets"] for s in a["full"]]
    assert a["epoch_after"] == b["epoch_after"] == 1


def test_resume_on_two_ranks_continues_exactly(run):
    _, ranks = run
    for r in ranks:
        assert r["states_equal"]
        assert r["resumed"] == r["full"][STOP:]


def test_validation_every_sample_once_same_count(run):
    shards, (a, b) = run
    assert a["val_count"] == b["val_count"] > 0
    assert sorted(a["val_ids"] + b["val_ids"]) == list(range(shards.num_samples("val")))
