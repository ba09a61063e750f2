"""Data pipeline: make_shards MB/s with 1 and 2 workers, and stream tokens/s against what training the tiny model eats.

    python tools/bench.py data [--input PATH ...] [--tokenizer tokenizer.model] [--max-mb 3] [--steps 300]
    python tools/bench.py data --data shards/NAME|https://...|s3://... [--cache-dir DIR] [--storage-options JSON]

Input: --input, else ../shared/corpora when present, else the built-in corpus (Python stdlib source).
Without --tokenizer a 8,000-piece tokenizer is trained on the input first (not timed). With --data the
stream is measured on that shard set (a folder or a URL, read through the node's cache) and make_shards
is not run.
Figures:
  make_shards_mb_s_{1,2}_workers  text MB/s through write_shards; scaling = ratio of the two (ideal 2.0)
  stream_tokens_s_per_rank_K       real tokens/s one rank (of 2) gets from TrainStream with K DataLoader workers
  train_tokens_s                   real tokens/s a plain PyTorch fwd + bwd + AdamW step of the tiny AndyLM
                                   consumes at micro-batch 16, sequences up to 256, on this machine
  stream_over_train_K              the ratio (aim: >= 50, so data loading is never the bottleneck)
  padding_fraction[_bucket_window_16]  padded share of positions (2 ranks x micro-batch 16 x 1 accumulation
                                   step: 2 buckets per global batch), and with windows of 16 global batches
  rank_balance_W{W}_A{A}            per step, how the ranks' work differs, before (equal rows; micro-batch j of
                                   the length-sorted step to rank j mod W) and after (andy_dist.data.batch_plan:
                                   cut by padded size, dealt largest first to the least loaded rank):
                                   {padded,real}_spread_{before,after}: (max - min) / mean over ranks of padded
                                   positions (the work) and real tokens, averaged over steps;
                                   last_rank_slowest_{before,after}: share of steps whose largest padded load
                                   is the last rank's; step_work_after_over_before: the slowest rank's padded
                                   positions summed over steps (what synchronous steps wait for), after / before;
                                   padding_{before,after}: padded share of all ranks' positions
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from andy_dist.config import SIZES
from andy_dist.data.corpus import read_documents, resolve_inputs, write_default_corpus
from andy_dist.data.remote import parse_storage_options
from andy_dist.data.shard_cache import DataAccess
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.shard_writer import write_shards
from andy_dist.data.stream import TrainStream
from andy_dist.data.tokenizer import Tokenizer, train_tokenizer
from andy_dist.model import AndyLM

SHARED_CORPORA = Path(__file__).resolve().parents[3] / "shared" / "corpora"
MICRO_BATCH, SEQ_LEN = 16, 256


def add_arguments(parser) -> None:
    parser.add_argument("--input", nargs="+", help="text to shard (default: ../shared/corpora or the stdlib corpus)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: train a 8,000-piece one on the input)")
    parser.add_argument("--max-mb", type=float, default=3.0, help="use at most this much input text")
    parser.add_argument("--steps", type=int, default=300, help="stream steps to time")
    parser.add_argument("--train-steps", type=int, default=6, help="training steps to time (after 1 warm-up)")
    parser.add_argument("--data", help="stream this shard set (a folder or a URL) instead of making one")
    parser.add_argument("--cache-dir", help="node-local cache for a remote --data")
    parser.add_argument("--storage-options", help="JSON object of fsspec options for a --data URL")


def _bench_input(args, work: Path) -> Path:
    """One .jsonl of at most --max-mb of the chosen text, so every run measures the same bytes."""
    if args.input:
        sources = [str(p) for p in resolve_inputs(args.input)]
    elif SHARED_CORPORA.is_dir():
        sources = [str(p) for p in sorted(SHARED_CORPORA.iterdir()) if p.suffix in (".txt", ".jsonl")]
    else:
        sources = [str(write_default_corpus(work / "stdlib.jsonl", max_bytes=int(args.max_mb * 1e6)))]
    limit, size = int(args.max_mb * 1e6), 0
    out = work / "bench.jsonl"
    with open(out, "w", encoding="utf-8") as handle:
        for doc in read_documents(sources):
            # A single-file book is one document; cut it into paragraphs so there are many documents.
            for paragraph in doc.text.split("\n\n") if len(doc.text) > 100_000 else [doc.text]:
                handle.write(json.dumps({"text": paragraph}, ensure_ascii=False) + "\n")
                size += len(paragraph.encode("utf-8"))
            if size >= limit:
                break
    return out


def _make_shards_mb_s(source: Path, tokenizer: Tokenizer, out: Path, workers: int) -> tuple[float, dict]:
    start = time.perf_counter()
    manifest = write_shards([source], tokenizer, out, val_fraction=0.01, shard_size_mb=16, workers=workers,
                            max_seq_len=SEQ_LEN, progress=False)
    seconds = time.perf_counter() - start
    return manifest["stats"]["bytes_in"] / 1e6 / seconds, manifest


def _stream_tokens_s(shards, workers: int, steps: int, bucket_window: int = 1) -> tuple[float, float]:
    """Real tokens per second rank 0 of 2 receives, and its mean padding fraction."""
    stream = TrainStream(shards, rank=0, world_size=2, micro_batch_size=MICRO_BATCH, grad_accum=1, seed=0,
                         num_workers=workers, max_seq_len=SEQ_LEN, bucket_window=bucket_window)
    tokens, padding, count = 0, 0.0, 0
    start = time.perf_counter()
    while count < steps:  # several epochs if the corpus is small; worker start-up is included
        for step in itertools.islice(stream.iter_epoch(), steps - count):
            for mb in step.micro_batches:
                tokens += mb.num_tokens
                padding += mb.padding_fraction
            count += 1
    return tokens / (time.perf_counter() - start), padding / count


def _train_tokens_s(shards, vocab_size: int, steps: int) -> float:
    """Real tokens per second of fwd + bwd + AdamW on the tiny model with the stream's own batches."""
    torch.manual_seed(0)
    model = AndyLM(SIZES["tiny"].replace(vocab_size=vocab_size, max_seq_len=SEQ_LEN))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    stream = TrainStream(shards, rank=0, world_size=1, micro_batch_size=MICRO_BATCH, grad_accum=1, seed=0,
                         max_seq_len=SEQ_LEN)
    batches = [step.micro_batches[0] for step in itertools.islice(stream.iter_epoch(), steps + 1)]
    tokens, seconds = 0, 0.0
    for i, mb in enumerate(batches):
        start = time.perf_counter()
        out = model(mb.input_ids, mb.targets, mb.attention_mask)
        (out.loss_sum / out.target_tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i > 0:  # the first step warms up allocators and kernels
            seconds += time.perf_counter() - start
            tokens += mb.num_tokens
    return tokens / seconds


def _loads(groups: list, capped: dict, world: int, ranks: list[list[int]]) -> tuple[list[int], list[int]]:
    """(padded positions, real tokens) per rank, rank r computing groups[i] for i in ranks[r]."""
    padded, real = [], []
    for indices in ranks:
        rows = [[capped[i] for i in groups[j]] for j in indices]
        padded.append(sum(len(r) * max(r) for r in rows))
        real.append(sum(sum(r) for r in rows))
    return padded, real


def _rank_balance(shards, world: int, accum: int, steps: int) -> dict:
    """Per-rank work of the first `steps` steps, as planned now and as the round-robin deal had it."""
    import numpy as np

    planner = TrainStream(shards, rank=0, world_size=world, micro_batch_size=MICRO_BATCH, grad_accum=accum, seed=0,
                          max_seq_len=SEQ_LEN).planner
    spreads = {key: [] for key in ("padded_before", "padded_after", "real_before", "real_after")}
    last_slowest = {"before": 0, "after": 0}
    slowest_work = {"before": 0, "after": 0}
    positions = {"before": 0, "after": 0}
    real_tokens = 0
    count = min(steps, planner.steps_from(0))
    for step in range(count):
        plan = planner.plan(0, step * planner.global_batch, step)
        capped = dict(zip(plan.sample_ids.tolist(), plan.lengths.tolist()))
        ordered = sorted(capped, key=lambda i: capped[i])
        old_groups = [ordered[j * MICRO_BATCH:(j + 1) * MICRO_BATCH] for j in range(world * accum)]
        old = _loads(old_groups, capped, world, [list(range(r, world * accum, world)) for r in range(world)])
        new = _loads([g.tolist() for g in plan.micro_batches], capped, world, plan.ranks)
        for name, (padded, real) in (("before", old), ("after", new)):
            spreads[f"padded_{name}"].append((max(padded) - min(padded)) / np.mean(padded))
            spreads[f"real_{name}"].append((max(real) - min(real)) / np.mean(real))
            last_slowest[name] += int(np.argmax(padded)) == world - 1
            slowest_work[name] += max(padded)
            positions[name] += sum(padded)
        real_tokens += sum(new[1])
    figures = {f"{key.split('_')[0]}_spread_{key.split('_')[1]}": round(float(np.mean(v)), 4)
               for key, v in spreads.items()}
    figures.update({f"last_rank_slowest_{k}": round(v / count, 3) for k, v in last_slowest.items()})
    figures["step_work_after_over_before"] = round(slowest_work["after"] / slowest_work["before"], 4)
    figures.update({f"padding_{k}": round(1 - real_tokens / v, 4) for k, v in positions.items()})
    figures["steps"] = count
    return figures


def _stream_figures(shards, vocab_size: int, args) -> dict:
    figures = {"train_samples": shards.num_samples("train")}
    train = _train_tokens_s(shards, vocab_size, args.train_steps)
    figures["train_tokens_s"] = round(train, 1)
    for workers in (0, 2):
        tokens_s, padding = _stream_tokens_s(shards, workers, args.steps)
        figures[f"stream_tokens_s_per_rank_{workers}_workers"] = round(tokens_s, 1)
        figures[f"stream_over_train_{workers}_workers"] = round(tokens_s / train, 1)
        figures["padding_fraction"] = round(padding, 4)
    figures["padding_fraction_bucket_window_16"] = round(_stream_tokens_s(shards, 0, args.steps, 16)[1], 4)
    for world, accum in ((2, 1), (4, 2)):
        figures[f"rank_balance_W{world}_A{accum}"] = _rank_balance(shards, world, accum, args.steps)
    figures["cpu_threads"] = torch.get_num_threads()
    return figures


def run(args) -> dict:
    if args.data:
        access = DataAccess(cache_dir=args.cache_dir, storage_options=parse_storage_options(args.storage_options),
                            prefetch=True)
        shards = open_shards(args.data, verify="once", access=access)
        try:
            return {"data": args.data, **_stream_figures(shards, shards.vocab_size, args)}
        finally:
            shards.close()
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        work = Path(tmp)
        source = _bench_input(args, work)
        if args.tokenizer:
            tokenizer = Tokenizer.from_file(args.tokenizer)
        else:
            tokenizer = Tokenizer.from_file(train_tokenizer(read_documents([str(source)]), 8000, work / "tok",
                                                            sample_sentences=200_000))
        mb_s_1, _ = _make_shards_mb_s(source, tokenizer, work / "shards1", workers=1)
        mb_s_2, manifest = _make_shards_mb_s(source, tokenizer, work / "shards2", workers=2)
        shards = open_shards(work / "shards2", tokenizer=tokenizer)
        figures = {
            "input_mb": round(manifest["stats"]["bytes_in"] / 1e6, 3),
            "bytes_per_token": manifest["stats"]["bytes_per_token"],
            "byte_fallback_share": manifest["stats"]["byte_fallback_share"],
            "near_duplicates_dropped": manifest["stats"]["dropped"]["near_duplicate"],
            "make_shards_mb_s_1_worker": round(mb_s_1, 3),
            "make_shards_mb_s_2_workers": round(mb_s_2, 3),
            "make_shards_scaling_2_over_1": round(mb_s_2 / mb_s_1, 3),
        }
        return {**figures, **_stream_figures(shards, tokenizer.vocab_size, args)}
