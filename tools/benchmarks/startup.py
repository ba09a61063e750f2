"""Start-up time of training, from process start to the first step, on 2 ranks, for 1x and 10x the shard bytes.

    python tools/bench.py startup [--mb 4] [--times 40] [--scale 10] [--shard-mb 16] [--verify once full]

A real shard set is made from about --mb MB of the built-in corpus (Python's standard library source).
The 1x set holds its samples --times over, the 10x set --times x --scale over, written by the shard
writer's own SplitWriter without tokenizing again (start-up cost depends on bytes, shards and samples,
not on what the text says), in shards of --shard-mb MB. For each data_verify level the trainer is started
with torchrun on 2 CPU ranks for one step, twice with the same node cache folder (the first start
hashes what it reads, the second finds it remembered); the time from launching torchrun to step 1 in
metrics.jsonl is measured (median of --repeat).

Figures: `seconds[VERIFY][first|second][1x|10x]`, and `ratio_10x_over_1x[VERIFY][first|second]`. The target
for the default (`once`): the 10x start takes less than 1.5x the 1x start. `full` (every rank reads and
decodes every shard at every start, the old default) is the baseline measured in the same run. A whole
start is mostly imports and DeepSpeed's set-up (10-15 s on 2 CPU cores); `data_seconds` also times the
data part alone, in this process: opening the set and reading rank 0's first step (median of
--data-repeat).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def add_arguments(parser) -> None:
    parser.add_argument("--mb", type=float, default=4.0, help="text tokenized for the real shard set, MB")
    parser.add_argument("--times", type=int, default=40, help="the 1x set holds the real set's samples this often")
    parser.add_argument("--scale", type=int, default=10, help="the large set holds this many times the 1x set")
    parser.add_argument("--shard-mb", type=float, default=16.0, help="shard size of the 1x and large sets, MB")
    parser.add_argument("--verify", nargs="+", default=["once", "full"], help="data_verify levels to time")
    parser.add_argument("--repeat", type=int, default=1, help="time each start this many times (the median)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds one start may take")
    parser.add_argument("--data-repeat", type=int, default=5, help="times the data part alone is timed")


def _real_set(work: Path, megabytes: float) -> tuple[Path, Path]:
    """(tokenizer, shard set) made the usual way from the built-in corpus."""
    from andy_dist.data.corpus import read_documents, write_default_corpus
    from andy_dist.data.shard_writer import write_shards
    from andy_dist.data.tokenizer import train_tokenizer

    corpus = write_default_corpus(work / "corpus.jsonl", int(megabytes * 1e6))
    tokenizer = train_tokenizer(read_documents([str(corpus)]), 2000, work / "tok", sample_sentences=100_000)
    write_shards([str(corpus)], tokenizer, work / "real", val_fraction=0.01, workers=2, max_seq_len=128,
                 progress=False)
    return tokenizer, work / "real"


def _repeated_set(real: Path, out: Path, times: int, shard_mb: float) -> Path:
    """`real`'s samples `times` over, in its manifest's format, written by SplitWriter (see the module doc)."""
    import numpy as np

    from andy_dist.data.shard_format import SPLITS, write_manifest
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.shard_writer import DEFAULT_BLOCK_TOKENS, SplitWriter

    shards = open_shards(real, verify="size")
    manifest = json.loads(json.dumps(shards.manifest))
    out.mkdir(parents=True)
    for split in SPLITS:
        samples = shards.reader(split).read(np.arange(shards.num_samples(split)))
        writer = SplitWriter(out, split, shards.dtype, int(shard_mb * 1e6), DEFAULT_BLOCK_TOKENS)
        for _ in range(times):
            for sample in samples:
                writer.add(sample)
        writer.stats.text_bytes = shards.text_bytes(split) * times
        writer.stats.documents = shards.documents(split) * times
        manifest["splits"][split] = writer.finish()
    write_manifest(out, manifest)
    return out


def _shard_sets(work: Path, args) -> tuple[Path, dict[str, Path]]:
    tokenizer, real = _real_set(work, args.mb)
    sets = {label: _repeated_set(real, work / f"shards-{label}", times, args.shard_mb)
            for label, times in (("1x", args.times), (f"{args.scale}x", args.times * args.scale))}
    shutil.rmtree(real)
    return tokenizer, sets


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _first_step_s(data: Path, tokenizer: Path, out: Path, verify: str, cache: Path, timeout: float) -> float:
    """Seconds from launching torchrun (2 ranks) to step 1 in metrics.jsonl."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    import torch

    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(_free_port()), str(ROOT / "launch" / "train.py"), "--ds_config", "ds_configs/tiny.json",
               "--data", str(data), "--tokenizer", str(tokenizer), "--out", str(out), "model.vocab_size=2000",
               "precision=fp32", "sample_prompts=[]", "--wandb", "disabled", "--max-steps", "1",
               f"data_verify={verify}", f"cache_dir={cache}", "log_interval=1"]
    metrics = out / "metrics.jsonl"
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        while time.perf_counter() - start < timeout:
            if metrics.exists() and '"step": 1' in metrics.read_text():
                return time.perf_counter() - start
            if proc.poll() is not None:
                raise RuntimeError(f"training stopped before its first step:\n{proc.stderr.read()[-3000:]}")
            time.sleep(0.02)
        raise RuntimeError(f"no first step within {timeout} s")
    finally:
        proc.wait(timeout=timeout)


def _data_s(data: Path, tokenizer: Path, verify: str, cache: Path) -> float:
    """Seconds to open the set as the trainer does and read rank 0's (of 2) first step."""
    from andy_dist.data.shard_cache import DataAccess
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.stream import TrainStream

    start = time.perf_counter()
    shards = open_shards(data, tokenizer=tokenizer, verify=verify, access=DataAccess(cache_dir=cache))
    stream = TrainStream(shards, rank=0, world_size=2, micro_batch_size=16, seed=1234, max_seq_len=512)
    steps = stream.iter_epoch()
    next(steps)
    seconds = time.perf_counter() - start
    steps.close()
    return seconds


def _data_figures(sets: dict, tokenizer: Path, work: Path, args) -> dict:
    import statistics

    figures: dict = {}
    for verify in args.verify:
        for label, data in sets.items():
            runs = {"first": [], "second": []}
            for attempt in range(args.data_repeat):
                cache = work / f"data-cache-{verify}-{label}-{attempt}"
                for start in ("first", "second"):
                    runs[start].append(_data_s(data, tokenizer, verify, cache))
            for start, times in runs.items():
                figures.setdefault(verify, {}).setdefault(start, {})[label] = round(statistics.median(times), 3)
    return figures


def _ratios(seconds: dict, large: str) -> dict:
    return {verify: {start: round(by[large] / by["1x"], 3) for start, by in starts.items()}
            for verify, starts in seconds.items()}


def run(args) -> dict:
    import statistics

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    try:
        tokenizer, sets = _shard_sets(work, args)
        bytes_of = {label: sum(p.stat().st_size for p in folder.glob("*.tar")) for label, folder in sets.items()}
        seconds: dict = {}
        for verify in args.verify:
            for label, data in sets.items():
                for start in ("first", "second"):
                    times = []
                    for attempt in range(args.repeat):
                        cache = work / f"cache-{verify}-{label}-{attempt}"  # the second start reuses the first's
                        out = work / f"run-{verify}-{label}-{start}-{attempt}"
                        times.append(_first_step_s(data, tokenizer, out, verify, cache, args.timeout))
                    seconds.setdefault(verify, {}).setdefault(start, {})[label] = round(statistics.median(times), 2)
        large = f"{args.scale}x"
        data_seconds = _data_figures(sets, tokenizer, work, args)
        return {
            "data_seconds": data_seconds,
            f"data_ratio_{large}_over_1x": _ratios(data_seconds, large),
            "shard_bytes": bytes_of,
            "shards": {label: len(list(folder.glob("*.tar"))) for label, folder in sets.items()},
            "seconds": seconds,
            f"ratio_{large}_over_1x": _ratios(seconds, large),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
