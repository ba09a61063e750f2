"""The training and validation streams (andy_dist.data.stream, planned by andy_dist.data.batch_plan) on real shards.

Ranks are simulated here by building one stream per rank in this process (the stream needs no
communication: every rank derives the same plan); tests/dist runs the same on 2 real processes.
DataLoader workers are real worker processes wherever num_workers > 0.
"""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UserError
from andy_dist.config import SIZES, ConfigError
from andy_dist.data.batch_plan import SeqLenSchedule
from andy_dist.data.corpus import read_documents
from andy_dist.data.shard_format import MANIFEST
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.shard_writer import write_shards
from andy_dist.data.stream import TrainStream, ValStream, collate
from andy_dist.model import AndyLM
from andy_dist.train.settings import load_train_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory, builtin_corpus) -> Path:
    """Paragraphs of the built-in corpus as documents (about 300 KB): samples of very different lengths."""
    texts, size = [], 0
    for doc in read_documents([str(builtin_corpus)]):
        for paragraph in doc.text.split("\n\n"):
            texts.append(paragraph)
            size += len(paragraph)
        if size > 300_000:
            break
    path = tmp_path_factory.mktemp("paragraphs") / "paragraphs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory, paragraphs, tokenizer) -> Path:
    """A few thousand train samples of 3..128 tokens in 3 shards of uneven size, many blocks each."""
    out = tmp_path_factory.mktemp("data") / "paragraphs128"
    write_shards([paragraphs], tokenizer, out, val_fraction=0.1, shard_size_mb=0.15, workers=2,
                 max_seq_len=128, block_tokens=2048, progress=False)
    return out


@pytest.fixture(scope="module")
def shards(shards_dir, tokenizer):
    shard_set = open_shards(shards_dir, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size)
    assert len(shard_set.train) == 3 and len({s.samples for s in shard_set.train}) == 3  # uneven
    return shard_set


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, paragraphs, tokenizer):
    out = tmp_path_factory.mktemp("data") / "one"
    write_shards([paragraphs], tokenizer, out, val_fraction=0.1, workers=1, max_seq_len=128,
                 block_tokens=4096, progress=False)
    shard_set = open_shards(out)
    assert len(shard_set.train) == 1
    return shard_set


def stream(shard_set, rank=0, world_size=1, micro_batch_size=4, grad_accum=2, seed=7, num_workers=0, **kw):
    return TrainStream(shard_set, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size,
                       grad_accum=grad_accum, seed=seed, num_workers=num_workers, max_seq_len=128, **kw)


def epoch_record(s: TrainStream, limit: int | None = None, workers: bool = False) -> list[dict]:
    """Per step: epoch, index, sample ids and tokens per micro-batch (and which worker built it)."""
    out = []
    for step in s.iter_epoch():
        out.append({"epoch": step.epoch, "step": step.step_in_epoch, "global": step.global_sample_ids.tolist(),
                    "ids": [mb.sample_ids.tolist() for mb in step.micro_batches],
                    "inputs": [mb.input_ids.tolist() for mb in step.micro_batches],
                    "targets": step.global_target_tokens})
        if workers:
            out[-1]["workers"] = [mb.worker for mb in step.micro_batches]
        if limit is not None and len(out) == limit:
            break
    return out


# --- exactly once, disjoint, equal counts ------------------------------------------------------------


@pytest.mark.parametrize("set_name", ["shards", "one_shard"])
def test_every_sample_once_per_epoch_across_ranks_and_workers(set_name, request):
    """W=2 ranks x K=2 real DataLoader workers; also with a single shard (fewer shards than readers)."""
    shard_set = request.getfixturevalue(set_name)
    world, workers = 2, 2
    readers: dict[tuple[int, int], list[int]] = {}
    steps = []
    for rank in range(world):
        s = stream(shard_set, rank, world, num_workers=workers)
        record = epoch_record(s, workers=True)
        steps.append(len(record))
        for step in record:
            assert len(step["ids"]) == 2  # exactly grad_accum micro-batches
            for ids, worker in zip(step["ids"], step["workers"]):
                readers.setdefault((rank, worker), []).extend(ids)
        assert s.epoch == 1 and s.samples_in_epoch == 0  # exhausted: at the start of the next epoch
    n, g = shard_set.num_samples("train"), 2 * 4 * 2
    assert steps == [n // g, n // g]
    assert set(readers) == {(r, w) for r in range(world) for w in range(workers)}  # every reader worked
    everything = [i for ids in readers.values() for i in ids]
    assert len(everything) == len(set(everything)) == (n // g) * g  # disjoint, each at most once
    assert n - len(everything) == s.dropped_per_epoch < g  # the documented remainder, nothing else
    assert set(everything) <= set(range(n))


def test_equal_micro_batch_counts_on_uneven_shards(shards):
    counts = [[len(step.micro_batches)
               for step in stream(shards, rank, 2, micro_batch_size=3, grad_accum=3).iter_epoch()]
              for rank in range(2)]
    assert counts[0] == counts[1] and set(counts[0]) == {3}
    val_counts = [len(list(ValStream(shards, rank, 3, micro_batch_size=5, max_seq_len=128))) for rank in range(3)]
    assert len(set(val_counts)) == 1


def test_same_seed_same_stream_and_new_permutation_each_epoch(shards):
    a, b = stream(shards, num_workers=2), stream(shards, num_workers=0)
    first_a, first_b = epoch_record(a), epoch_record(b)
    assert first_a == first_b  # same seed, any number of workers
    second = epoch_record(a)
    assert [s["epoch"] for s in second] == [1] * len(second)
    order0 = [i for s in first_a for i in s["global"]]
    order1 = [i for s in second for i in s["global"]]
    assert order0 != order1 and len(set(order0) ^ set(order1)) <= 2 * a.dropped_per_epoch
    other_seed = epoch_record(stream(shards, seed=8), limit=3)
    assert [s["global"] for s in other_seed] != [s["global"] for s in first_a[:3]]


# --- resume ------------------------------------------------------------------------------------------


def test_resume_mid_epoch_and_at_epoch_end(shards):
    reference = stream(shards)
    full = epoch_record(reference) + epoch_record(reference, limit=4)
    steps = reference.steps_per_epoch

    for stop in (5, steps):  # mid-epoch, and right after the epoch's last step
        first = stream(shards, num_workers=2)
        seen = epoch_record(first, limit=stop)
        state = json.loads(json.dumps(first.state_dict()))  # JSON-able
        resumed = stream(shards, num_workers=1)
        resumed.load_state_dict(state)
        rest = epoch_record(resumed)
        if stop == steps:
            assert state["epoch"] == 1 and state["samples_in_epoch"] == 0
            assert len(rest) == steps and rest[:4] == full[steps:]  # the next epoch, whole
        else:
            rest += epoch_record(resumed, limit=4)
            assert seen + rest == full


def test_resume_reads_nothing_it_skips(tmp_path, shards_dir, shards):
    """Damage a block that only the skipped steps use: the resumed stream never notices."""
    copy = tmp_path / "copy"
    shutil.copytree(shards_dir, copy)
    kwargs = {"micro_batch_size": 8, "grad_accum": 1, "shuffle_window_blocks": 1}
    probe = stream(open_shards(copy), **kwargs)
    skip = 20
    plans = [probe.planner.plan(0, i * probe.global_batch, i) for i in range(probe.steps_per_epoch)]
    index = probe.shards.block_index("train")
    assert index.paths[0].parent == copy

    def blocks(plan_list):
        ids = np.concatenate([p.sample_ids for p in plan_list])
        return set((np.searchsorted(index.first_sample, ids, side="right") - 1).tolist())

    only_skipped = sorted(blocks(plans[:skip]) - blocks(plans[skip:]))
    assert only_skipped
    victim = only_skipped[0]
    path, offset = index.paths[victim], int(index.offsets[victim])
    data = bytearray(path.read_bytes())
    data[offset:offset + 1024] = b"\x00" * 1024
    path.write_bytes(bytes(data))
    damaged = open_shards(copy, verify="size")

    state = probe.state_dict() | {"samples_in_epoch": skip * probe.global_batch, "steps_in_epoch": skip,
                                  "consumed_steps": skip, "consumed_samples": skip * probe.global_batch}
    resumed = stream(damaged, **kwargs)
    resumed.load_state_dict(state)
    assert len(epoch_record(resumed)) == probe.steps_per_epoch - skip
    with pytest.raises(UserError, match=path.name):  # an uninterrupted run does read it
        epoch_record(stream(damaged, **kwargs))


def test_resume_with_another_world_size_at_the_same_global_batch(shards):
    """2 ranks x (M=2, A=2) -> 1 rank x (M=4, A=2): the same global batches, the same rows."""
    two = [stream(shards, rank, 2, micro_batch_size=2, grad_accum=2) for rank in range(2)]
    ref = [stream(shards, rank, 2, micro_batch_size=2, grad_accum=2) for rank in range(2)]
    reference = [epoch_record(s) for s in ref]
    stop = 7
    for s in two:
        epoch_record(s, limit=stop)
    assert two[0].state_dict() == two[1].state_dict()
    one = stream(shards, 0, 1, micro_batch_size=4, grad_accum=2)
    one.load_state_dict(two[0].state_dict())
    rest = epoch_record(one)
    assert len(rest) == len(reference[0]) - stop
    for k, step in enumerate(rest):
        before = [reference[r][stop + k] for r in range(2)]
        assert step["global"] == before[0]["global"] and step["targets"] == before[0]["targets"]
        assert rows_of([step]) == rows_of(before)  # the same token rows, computed by one rank
        assert len(step["ids"]) == 2 and sum(len(ids) for ids in step["ids"]) == 8  # A micro-batches, G rows


def rows_of(records: list[dict]) -> list[tuple[int, ...]]:
    return sorted(tuple(t for t in row if t != PAD_ID) for r in records for batch in r["inputs"] for row in batch)


def test_state_from_another_run_is_refused(shards, one_shard):
    state = stream(shards).state_dict()
    with pytest.raises(UserError, match="seed"):
        stream(shards, seed=99).load_state_dict(state)
    with pytest.raises(UserError, match="train_fingerprint"):
        stream(one_shard).load_state_dict(state)
    with pytest.raises(UserError, match="seq_len_schedule"):
        stream(shards, seq_len_schedule=SeqLenSchedule(32, 128, 10)).load_state_dict(state)


# --- batches -----------------------------------------------------------------------------------------


def test_micro_batch_contents(shards, tokenizer):
    s = stream(shards, micro_batch_size=6, grad_accum=2)
    reader = shards.reader("train")
    bos_rows = 0
    for step in itertools.islice(s.iter_epoch(), 40):
        for mb in step.micro_batches:
            x, y, m = mb.input_ids, mb.targets, mb.attention_mask
            assert x.dtype == y.dtype == m.dtype == torch.int64 and x.shape == y.shape == m.shape
            assert bool((x[m == 0] == PAD_ID).all()) and bool((x[m == 1] != PAD_ID).all())  # PAD only in padding
            assert bool((y[m == 0] == PAD_ID).all())  # padding never in the loss
            assert int(x.max()) < tokenizer.vocab_size
            for row, sample_id in enumerate(mb.sample_ids.tolist()):
                sample = reader.read([sample_id])[0].astype(np.int64)
                n = len(sample)
                assert x[row, :n].tolist() == sample.tolist() and int(m[row].sum()) == n
                assert y[row, :n - 1].tolist() == sample[1:].tolist() and int(y[row, n - 1]) == PAD_ID
                bos_rows += int(sample[0] == BOS_ID)
                assert BOS_ID not in sample[1:] and EOS_ID not in sample[:-1]  # BOS/EOS only at the ends
            assert mb.num_tokens == int(m.sum()) and mb.num_target_tokens == int((y != PAD_ID).sum())
        assert step.global_target_tokens == sum(mb.num_target_tokens for mb in step.micro_batches)
    assert bos_rows > 0


def test_length_bucketing_lowers_padding(shards):
    s = stream(shards, micro_batch_size=8, grad_accum=4)
    bucketed, unsorted = [], []
    lengths = shards.lengths("train")
    for step in itertools.islice(s.iter_epoch(), 20):
        bucketed.append(step.padding_fraction)
        rows = lengths[step.global_sample_ids].reshape(4, 8)  # the same samples in epoch order
        unsorted.append(1 - rows.sum() / (rows.max(axis=1).sum() * 8))
    assert np.mean(bucketed) < 0.5 * np.mean(unsorted)


def test_micro_batches_are_cut_by_padded_size_never_larger_than_equal_rows(shards):
    """Each step's micro-batches are cut so the largest padded size (rows x longest row) is as small as it
    can be: never above what M rows each would give, below it on steps of mixed lengths, short rows sharing
    a micro-batch in greater numbers. (This replaced max_tokens_per_micro_batch, a budget that could not
    bind: it had to be at least M x max_seq_len, which M rows of any length always fit.)"""
    M, A = 4, 2
    s = stream(shards, micro_batch_size=M, grad_accum=A)
    lengths = shards.lengths("train")
    smaller, rows = 0, set()
    for step in itertools.islice(s.iter_epoch(), 30):
        assert len(step.micro_batches) == A and len(step.global_sample_ids) == M * A
        assert sorted(step.sample_ids.tolist()) == sorted(step.global_sample_ids.tolist())
        largest = max(mb.input_ids.numel() for mb in step.micro_batches)
        by_length = np.sort(lengths[step.global_sample_ids])
        equal_rows = max(M * int(by_length[(j + 1) * M - 1]) for j in range(A))
        assert largest <= equal_rows
        smaller += largest < equal_rows
        rows.update(mb.input_ids.shape[0] for mb in step.micro_batches)
    assert smaller >= 5 and len(rows) > 1, (smaller, rows)
    with pytest.raises(TypeError):
        stream(shards, micro_batch_size=4, max_tokens_per_micro_batch=512)
    for override in ("max_tokens_per_micro_batch=4096", "data.max_tokens_per_micro_batch=4096"):
        with pytest.raises(ConfigError, match="max_tokens_per_micro_batch was removed: .* lower micro_batch_size"):
            load_train_config(overrides=[override])


def test_sequence_length_schedule(shards):
    schedule = SeqLenSchedule(start=16, end=128, ramp_steps=12, multiple_of=8)
    assert [schedule.cap(i) for i in (0, 3, 6, 12, 100)] == [16, 40, 72, 128, 128]
    s = stream(shards, seq_len_schedule=schedule)
    reader = shards.reader("train")
    record = []
    for step in itertools.islice(s.iter_epoch(), 14):
        record.append(step.seq_len)
        for mb in step.micro_batches:
            assert mb.input_ids.shape[1] <= step.seq_len
            for row, sample_id in enumerate(mb.sample_ids.tolist()):
                sample = reader.read([sample_id])[0].astype(np.int64)
                if len(sample) > step.seq_len:  # cut: the token after the cut is the last target
                    assert int(mb.targets[row, step.seq_len - 1]) == sample[step.seq_len]
    assert record == [schedule.cap(i) for i in range(14)]
    # The schedule position is part of the state: a resumed stream continues the ramp.
    partial = stream(shards, seq_len_schedule=schedule)
    epoch_record(partial, limit=5)
    resumed = stream(shards, seq_len_schedule=schedule)
    resumed.load_state_dict(partial.state_dict())
    assert next(iter(resumed.iter_epoch())).seq_len == schedule.cap(5)


def test_padding_never_changes_the_loss(shards, tokenizer):
    """A real model: a padded micro-batch's summed loss equals the rows' losses computed alone."""
    torch.manual_seed(0)
    model = AndyLM(SIZES["tiny"].replace(vocab_size=tokenizer.vocab_size, max_seq_len=128, dropout=0.0)).eval()
    mb = next(iter(stream(shards, micro_batch_size=4, grad_accum=1).iter_epoch())).micro_batches[0]
    samples = shards.reader("train").read(mb.sample_ids.numpy())
    mixed = collate([samples[0][:20], samples[1]], cap=128, sample_ids=[0, 1])  # very different lengths
    with torch.no_grad():
        out = model(mixed.input_ids, mixed.targets, mixed.attention_mask)
        alone = sum(float(model(torch.as_tensor(s.astype(np.int64))[None], collate([s], 128, [0]).targets).loss_sum)
                    for s in (samples[0][:20], samples[1]))
    assert int(out.target_tokens) == mixed.num_target_tokens
    assert abs(float(out.loss_sum) - alone) < 1e-3 * alone


# --- validation and errors ---------------------------------------------------------------------------


@pytest.mark.parametrize("world_size,workers", [(1, 0), (3, 2)])
def test_validation_every_sample_once_same_count(shards, world_size, workers):
    streams = [ValStream(shards, r, world_size, micro_batch_size=7, max_seq_len=128, num_workers=workers)
               for r in range(world_size)]
    passes = [list(v) for v in streams]
    assert len({len(p) for p in passes}) == 1 and all(len(p) == len(v) for p, v in zip(passes, streams))
    ids = [i for p in passes for mb in p for i in mb.sample_ids.tolist() if i >= 0]
    assert sorted(ids) == list(range(shards.num_samples("val")))
    targets = sum(mb.num_target_tokens for p in passes for mb in p)
    assert targets == streams[0].target_tokens
    fillers = [mb for p in passes for mb in p if mb.num_tokens == 0]
    for mb in fillers:
        assert int(mb.attention_mask.sum()) == 0 and bool((mb.targets == PAD_ID).all())
    assert list(streams[-1]) and len(list(streams[-1])) == len(passes[-1])  # iterable again


def test_configuration_errors(shards, tmp_path, shards_dir):
    with pytest.raises(UserError, match="fewer than one global batch"):
        stream(shards, micro_batch_size=4096, grad_accum=1)
    with pytest.raises(UserError, match="max_seq_len=64"):
        TrainStream(shards, 0, 1, micro_batch_size=2, max_seq_len=64)
    with pytest.raises(UserError, match="rank 2"):
        stream(shards, rank=2, world_size=2)
    with pytest.raises(UserError, match="val split"):
        manifest = json.loads((shards_dir / MANIFEST).read_text())
        assert manifest["splits"]["val"]["samples"] > 0
        empty_val = open_shards(shards_dir)
        empty_val.manifest["splits"]["val"]["samples"] = 0
        ValStream(empty_val, 0, 1, 4, max_seq_len=128)


def test_bucket_window_lowers_padding_and_stays_exact(shards):
    """Windows of 8 global batches sorted by length: every sample still once, resumes still exact."""
    narrow = stream(shards, 0, 2, micro_batch_size=4, grad_accum=1)
    wide = [stream(shards, rank, 2, micro_batch_size=4, grad_accum=1, bucket_window=8) for rank in range(2)]
    padding = {"narrow": [s.padding_fraction for s in narrow.iter_epoch()], "wide": []}
    seen = []
    for s in wide:
        for step in s.iter_epoch():
            padding["wide"].append(step.padding_fraction)
            seen.extend(step.sample_ids.tolist())
    g = 8
    assert len(seen) == len(set(seen)) == wide[0].steps_per_epoch * g
    assert np.mean(padding["wide"]) < 0.5 * np.mean(padding["narrow"])

    reference = epoch_record(stream(shards, 0, 2, micro_batch_size=4, grad_accum=1, bucket_window=8))
    first = stream(shards, 0, 2, micro_batch_size=4, grad_accum=1, bucket_window=8)
    head = epoch_record(first, limit=13)  # mid-window
    resumed = stream(shards, 0, 2, micro_batch_size=4, grad_accum=1, bucket_window=8, num_workers=2)
    resumed.load_state_dict(first.state_dict())
    assert head + epoch_record(resumed) == reference
    # Another global batch: refused mid-window, accepted at a window boundary, still exactly once.
    other = stream(shards, 0, 1, micro_batch_size=4, grad_accum=1, bucket_window=8)
    with pytest.raises(UserError, match="bucket_window"):
        other.load_state_dict(first.state_dict())
    boundary = stream(shards, 0, 1, micro_batch_size=8, grad_accum=1, bucket_window=8)
    epoch_record(boundary, limit=8)  # one whole window of 8 steps x 8 samples
    bigger = stream(shards, 0, 1, micro_batch_size=4, grad_accum=1, bucket_window=8)
    bigger.load_state_dict(boundary.state_dict())
    before = {i for step in epoch_record(stream(shards, 0, 1, micro_batch_size=8, grad_accum=1, bucket_window=8),
                                         limit=8) for i in step["global"]}
    after = [i for step in epoch_record(bigger) for i in step["global"]]
    assert len(after) == len(set(after)) and not before & set(after)
    assert len(before) + len(after) > shards.num_samples("train") - 8
