"""tools/bench.py runs end to end in its quick settings and reports what it promises.

No speed is asserted here (speed belongs to the benchmark's own ratios); the checks are the
benchmark's invariants: its figures exist and are finite, the FLOP formula matches the counter,
wider length buckets pad less, and shedding finished rows leaves the other rows' tokens unchanged
(the bench asserts that itself and would exit non-zero).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from tests.launching import ROOT, cpu_env


def bench(tmp_path, *args: str) -> dict:
    out = tmp_path / "figures.json"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), *args, "--out", str(out)], cwd=ROOT,
                            env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_section_imports_as_the_script_runs_it(tmp_path):
    """`python tools/bench.py SECTION` puts tools/ first on sys.path and imports `benchmarks.SECTION`, with no
    PYTHONPATH and from any folder: a section that imports its siblings as `tools.benchmarks.*` only worked
    where the repository root happened to be on the path (the tests' environment), never for a user."""
    env = cpu_env()
    env.pop("PYTHONPATH")
    code = ("import importlib, pathlib, sys; sys.path.insert(0, sys.argv[1]); "
            "names = sorted(p.stem for p in pathlib.Path(sys.argv[1], 'benchmarks').glob('*.py')); "
            "[importlib.import_module('benchmarks.' + n) for n in names]; print(len(names))")
    result = subprocess.run([sys.executable, "-c", code, str(ROOT / "tools")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout) >= 10


def test_generate_section(tmp_path):
    figures = bench(tmp_path, "generate", "--size", "tiny", "--skip-quality", "--skip-hf", "--batch-sizes", "2",
                    "--new-tokens", "16", "--threads", "1", "--repeats", "1")
    speed = figures["speed_cpu"]["batch_2"]
    assert speed["ours_fp32_tok_s"] > 0 and speed["ours_int8_tok_s"] > 0
    cold = figures["cold_cli"]["threads_1_batch_2"]  # tools/generate.py in a fresh process, sampled
    assert cold["ours_tok_s"]["median"] > 0 and cold["ours_wall_s"]["median"] > 0
    shed = figures["shedding"]
    assert shed["rows_stopping_early"] == shed["batch"] // 2 and shed["early_stop_tokens"] == 2
    assert math.isfinite(shed["speedup"]) and shed["speedup"] > 0


def test_mfu_section(tmp_path):
    figures = bench(tmp_path, "mfu", "--device", "cpu", "--dtype", "fp32", "--sizes", "tiny", "--batch", "2",
                    "--seq-len", "64", "--steps", "2", "--warmup", "1")
    (row,) = figures["results"]
    assert row["params"] == 2_956_800
    assert row["formula_vs_counter"] == pytest.approx(1.0, abs=1e-3)  # 6N + 12LdT equals the FLOP counter
    assert 0 < row["mfu"] < 1


def test_data_section(tmp_path):
    figures = bench(tmp_path, "data", "--max-mb", "0.2", "--steps", "20", "--train-steps", "2")
    assert figures["train_samples"] > 0 and figures["make_shards_mb_s_1_worker"] > 0
    assert figures["stream_over_train_0_workers"] > 0 and figures["stream_over_train_2_workers"] > 0
    assert figures["padding_fraction_bucket_window_16"] < figures["padding_fraction"]
    balance = figures["rank_balance_W2_A1"]  # the round-robin deal made the last rank the slowest every step
    assert balance["last_rank_slowest_before"] > 0.9 and balance["last_rank_slowest_after"] < 0.7
    assert balance["padded_spread_after"] < balance["padded_spread_before"]
    assert balance["step_work_after_over_before"] <= 1.0  # the largest micro-batch never grows


def test_sweep_section(tmp_path):
    """Two 2-trial studies of 4 steps: the same settings tried, pruning can only save steps, never find a
    better best trial (a complete trial of the pruned study trains exactly as in the other)."""
    figures = bench(tmp_path, "sweep", "--trials", "2", "--max-steps", "4", "--eval-interval", "2",
                    "--pruner-startup", "1")
    assert figures["steps_unpruned"] == 8 and 0 < figures["steps_pruned"] <= 8
    assert 0 < figures["steps_ratio"] <= 1
    assert math.isfinite(figures["best_val_ratio"]) and figures["best_val_ratio"] >= 1.0


def test_memory_section(tmp_path):
    """The chunked loss of the tiny head at 1,024 tokens holds a fraction of what the full fp32 logits hold."""
    figures = bench(tmp_path, "memory", "--size", "tiny", "--batch", "8", "--seq-len", "128", "--chunks", "128",
                    "--reps", "1", "--step-sizes", "tiny", "--step-batch", "1", "--step-seq-len", "16",
                    "--threads", "1")
    head = figures["head"]
    assert head["padded_rows"] == 10_112 and head["tokens"] == 1024
    assert 0 < head["cases"]["chunked_128"]["peak_mb"] < 0.5 * head["cases"]["full"]["peak_mb"]
    steps = figures["step"]["sizes"]["tiny"]["ms"]
    assert set(steps) == {"unpadded_full", "unpadded_chunked", "padded_full", "padded_chunked"}
    assert all(ms > 0 for ms in steps.values())


def test_data_section_streams_a_url(tmp_path, train_shards):
    """`bench data --data URL`: the stream benchmark reads a shard set served over HTTP (through the cache)."""
    from tests.servers import FileServer

    with FileServer(train_shards) as server:
        figures = bench(tmp_path, "data", "--data", server.url, "--cache-dir", str(tmp_path / "cache"), "--steps", "5",
                        "--train-steps", "1")
    assert figures["data"] == server.url and figures["train_samples"] > 0
    assert figures["stream_over_train_0_workers"] > 0 and server.count("train-000000.tar") == 1
