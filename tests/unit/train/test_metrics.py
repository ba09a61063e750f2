"""MetricsLogger: metrics.jsonl, samples.jsonl, the console and a real offline W&B run read back."""

from __future__ import annotations

import io
import json
import math
import os
import sys

import pytest
import torch

from andy_dist import UserError
from andy_dist.train.metrics import (
    FP16_KEYS,
    METRIC_KEYS,
    SAMPLE_KEYS,
    TRAIN_KEYS,
    VAL_KEYS,
    MetricsLogger,
    bits_per_byte,
    memory_gb,
    resolve_wandb_mode,
    validation_metrics,
)
from tests.launching import ROOT
from tests.wandb_offline import read_offline_runs

CONFIG = {"model": {"size": "tiny", "d_model": 128}, "data": {"seq_len": 128}, "deepspeed": {"zero": 2},
          "train": {"lr": 3e-4}}


def strict_lines(path):
    """Every line of a JSONL file, parsed as strict JSON (NaN/Infinity rejected)."""

    def reject(token):
        raise ValueError(f"non-standard JSON constant {token} in {path}")

    return [json.loads(line, parse_constant=reject) for line in path.read_text().splitlines()]


def train_values(step: int, mfu=0.31) -> dict:
    return {
        "train/loss": 5.0 / step, "train/lr": 3e-4, "train/grad_norm": torch.tensor(1.5),
        "train/tokens_per_s": 2000.0, "train/tokens_per_s_per_rank": 1000.0, "train/mfu": mfu,
        "train/tokens_per_s_compute": 2500.0, "train/data_wait_fraction": 0.05,
        "train/mfu_compute": None if mfu is None else 1.25 * mfu,
        "train/global_batch_seqs": 32, "train/global_batch_tokens": 4096, "train/padding_fraction": 0.1,
        "train/tokens_seen": 4096 * step, "train/epoch": 0, "sys/memory_gb": memory_gb(),
        "time/elapsed_s": 1.0 * step, "time/eta_s": 10.0 - step, "train/skipped_steps": 0, "train/overflow_skips": 0,
    }


def test_standard_keys_cover_the_issue_list():
    assert set(TRAIN_KEYS) | set(FP16_KEYS) | set(VAL_KEYS) | set(SAMPLE_KEYS) == set(METRIC_KEYS)
    assert {"train/mfu", "sys/memory_gb", "time/eta_s", "train/tokens_per_s_per_rank", "train/tokens_per_s_compute",
            "train/data_wait_fraction"} <= set(TRAIN_KEYS)
    assert {"samples/logprob", "samples/distinct_1", "samples/distinct_2", "samples/repeat_3gram",
            "samples/eos_fraction", "samples/length"} == set(SAMPLE_KEYS)
    assert set(VAL_KEYS) == {"val/loss", "val/ppl", "val/bpb", "val/best_loss", "val/bad_evals", "val/patience"}


def test_jsonl_is_strict_json_with_na_for_unknown(tmp_path):
    console = io.StringIO()
    with MetricsLogger(tmp_path, CONFIG, is_main=True, wandb_mode="disabled", total_steps=10,
                       console_stream=console) as log:
        log.log(1, {**train_values(1, mfu=None), "train/loss_scale": 65536.0, "train/skipped_steps": 0})
        log.log(2, {"train/loss": float("nan"), "train/grad_norm": float("inf")})
        log.log(2, validation_metrics(2.0, tokens=100, text_bytes=400, best_loss=2.0, bad_evals=0, patience=3))
    rows = strict_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 2]
    assert set(TRAIN_KEYS) | set(FP16_KEYS) <= set(rows[0])
    assert rows[0]["train/mfu"] == "n/a"
    assert rows[0]["train/grad_norm"] == 1.5  # a tensor became a number
    assert rows[1]["train/loss"] == "nan" and rows[1]["train/grad_norm"] == "inf"
    assert set(VAL_KEYS) <= set(rows[2]) and rows[2]["val/ppl"] == pytest.approx(math.exp(2.0))
    assert json.loads((tmp_path / "config.json").read_text()) == CONFIG
    text = console.getvalue()
    assert "W&B: disabled (as asked)" in text
    assert "step 1/10 | loss 5.0000" in text and "mfu n/a" in text
    assert "step 2 | val 2.0000" in text and "no-improve 0/3" in text


def test_offline_wandb_run_holds_metrics_config_and_samples_table(tmp_path):
    log = MetricsLogger(tmp_path, CONFIG, is_main=True, wandb_mode="offline", run_name="tiny-test", tags=("ci", "tiny"),
                        total_steps=3, console_stream=io.StringIO())
    for step in (1, 2, 3):
        log.log(step, train_values(step, mfu=None if step == 2 else 0.3))
    log.log(3, validation_metrics(2.5, 50, 200, 2.5, 0, 3))
    rows = [{"prompt": "Once upon", "completion": " a time", "temperature": 0.8, "top_p": 0.95},
            {"prompt": "def f(", "completion": "x):", "temperature": 0.8, "top_p": 0.95}]
    log.log_samples(3, rows)
    run_id = log.wandb_run_id
    log.close()
    log.close()  # twice is fine

    (run,) = read_offline_runs(tmp_path / "wandb")
    assert run.run_id == run_id and run.project == "andy-llm" and run.name == "tiny-test"
    assert run.tags == ["ci", "tiny"]
    assert run.config["model"] == CONFIG["model"] and run.config["deepspeed"] == CONFIG["deepspeed"]
    metrics = [h for h in run.history if "train/loss" in h]
    assert [h["step"] for h in metrics] == [1, 2, 3]
    assert set(TRAIN_KEYS) <= set(metrics[0])
    assert "train/mfu" not in metrics[1] and metrics[2]["train/mfu"] == 0.3  # unknown MFU omitted, not 0
    assert [h["train/loss"] for h in metrics] == pytest.approx([5.0, 2.5, 5 / 3])
    assert any(h.get("val/bpb") == pytest.approx(bits_per_byte(2.5, 50, 200)) for h in run.history)
    (table,) = run.tables("samples")
    assert table["columns"] == ["step", "prompt", "completion", "temperature", "top_p"]
    assert table["data"] == [[3, "Once upon", " a time", 0.8, 0.95], [3, "def f(", "x):", 0.8, 0.95]]
    samples = strict_lines(tmp_path / "samples.jsonl")
    assert samples == [{"step": 3, **row} for row in rows]


def test_resume_continues_the_same_wandb_run_and_appends(tmp_path):
    first = MetricsLogger(tmp_path, CONFIG, is_main=True, wandb_mode="offline", console_stream=io.StringIO())
    first.log(1, {"train/loss": 3.0})
    run_id = first.wandb_run_id
    first.close()
    second = MetricsLogger(tmp_path, CONFIG, is_main=True, wandb_mode="offline", resume_id=run_id,
                           console_stream=io.StringIO())
    assert second.wandb_run_id == run_id
    second.log(2, {"train/loss": 2.0})
    second.close()
    assert [r["step"] for r in strict_lines(tmp_path / "metrics.jsonl")] == [1, 2]
    runs = read_offline_runs(tmp_path / "wandb")
    assert len(runs) == 2 and {r.run_id for r in runs} == {run_id}  # `wandb sync` merges them into one run
    assert [h["step"] for r in runs for h in r.history] == [1, 2]


def test_non_main_rank_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "run", CONFIG, is_main=False, wandb_mode="offline", resume_id="abc")
    log.log(1, {"train/loss": 1.0})
    log.log_samples(1, [{"prompt": "a", "completion": "b"}])
    log.close()
    assert not (tmp_path / "run").exists()
    assert log.wandb_run_id == "abc"


def test_samples_need_prompt_and_completion(tmp_path):
    with MetricsLogger(tmp_path, CONFIG, is_main=True, wandb_mode="disabled", console_stream=io.StringIO()) as log:
        with pytest.raises(ValueError, match="prompt"):
            log.log_samples(1, [{"text": "a"}])


def test_progress_bar_on_a_terminal(tmp_path):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    with MetricsLogger(tmp_path, CONFIG, is_main=True, wandb_mode="disabled", total_steps=4,
                       console_stream=term) as log:
        log.log(2, train_values(2))
    out = term.getvalue()
    assert "2/4" in out and "loss=2.5000" in out and "mfu=31.0%" in out and "tok/s=2,000" in out


def test_wandb_mode_choice(tmp_path, capsys):
    home = tmp_path / "home"
    home.mkdir()
    assert resolve_wandb_mode("disabled", {}) == "disabled"
    with pytest.raises(UserError, match="--wandb must be one of online, offline, disabled"):
        resolve_wandb_mode("cloud", {})
    assert resolve_wandb_mode(None, {"HOME": str(home)}) == "offline"
    assert resolve_wandb_mode(None, {"HOME": str(home), "WANDB_API_KEY": "x" * 40}) == "online"
    assert resolve_wandb_mode(None, {"HOME": str(home), "WANDB_MODE": "dryrun"}) == "offline"
    assert resolve_wandb_mode(None, {"HOME": str(home), "WANDB_DISABLED": "true"}) == "disabled"
    netrc = home / ".netrc"
    netrc.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    netrc.chmod(0o600)
    assert resolve_wandb_mode(None, {"HOME": str(home)}) == "online"
    assert resolve_wandb_mode(None, {"HOME": str(home), "WANDB_BASE_URL": "https://wandb.example.org"}) == "offline"


def test_auto_mode_prints_one_line_saying_why(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "absent-netrc"))
    console = io.StringIO()
    with MetricsLogger(tmp_path / "run", CONFIG, is_main=True, wandb_mode=None, console_stream=console) as log:
        assert log.wandb_mode == "offline"
    (line,) = [text for text in console.getvalue().splitlines() if text.startswith("W&B:")]
    assert "offline (not logged in" in line and "wandb sync" in line
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*"))


def test_bits_per_byte_and_perplexity():
    # ln 2 nats per token over as many tokens as bytes is exactly one bit per byte
    assert bits_per_byte(math.log(2), 1000, 1000) == pytest.approx(1.0)
    assert bits_per_byte(2.0, 250, 1000) == pytest.approx(2.0 * 250 / (1000 * math.log(2)))
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 1, 0)
    assert validation_metrics(1000.0, 1, 1, 1.0, 1, 3)["val/ppl"] == math.inf


def test_memory_is_process_rss_on_cpu():
    # In a fresh process: in a long test session the allocator may hand back pages it already holds,
    # and the resident set would not grow.
    import subprocess

    code = ("import torch; from andy_dist.train.metrics import memory_gb; before = memory_gb('cpu'); "
            "block = torch.ones(64 * 2**20 // 4); print(memory_gb('cpu') - before)")
    grown = float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                 cwd=ROOT).stdout)
    assert 0.05 < grown < 0.2  # 64 MiB touched = 0.067 GB


# ---------------------------------------------------------------- a 2-rank CPU run


def _two_rank_worker(rank: int, world: int, port: int, run_dir: str) -> None:
    """Each rank trains the tiny model for 3 steps; all ranks call log, only rank 0 writes."""
    import time

    import torch.distributed as dist

    from andy_dist.config import model_config
    from andy_dist.model import AndyLM
    from andy_dist.train.flops import MfuMeter
    from andy_dist.train.throughput import SpeedWindow

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(rank)
    cfg = model_config("tiny", vocab_size=512)
    model = AndyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    meter = MfuMeter(cfg, seq_len=None, device="cpu", dtype=torch.float32)
    speed = SpeedWindow(world, total_steps=3, mfu_meter=meter)
    speed.start()
    tokens_seen, started = 0, time.perf_counter()
    log = MetricsLogger(run_dir, {"model": cfg.to_dict()}, is_main=rank == 0, wandb_mode="offline",
                        total_steps=3, console_stream=io.StringIO())
    for step in range(1, 4):
        start = time.perf_counter()
        batch = torch.randint(4, 512, (4, 33))
        out = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        (out.loss_sum / out.target_tokens).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        figures = torch.tensor([out.loss_sum.item(), out.target_tokens.item()], dtype=torch.float64)
        dist.all_reduce(figures)
        speed.stepped(4 * 32 * world, time.perf_counter() - start, meter.step_flops([32] * 4 * world))
        tokens_seen += 4 * 32 * world
        log.log(step, {
            "train/loss": figures[0].item() / figures[1].item(), "train/lr": 1e-3, "train/grad_norm": grad_norm,
            **speed.read(step), "train/global_batch_seqs": 4 * world,
            "train/global_batch_tokens": int(figures[1].item()), "train/padding_fraction": 0.0,
            "train/tokens_seen": tokens_seen, "train/epoch": 0,
            "sys/memory_gb": memory_gb("cpu"), "time/elapsed_s": time.perf_counter() - started,
            "train/skipped_steps": 0, "train/overflow_skips": 0,
        })
    log.close()
    dist.barrier()
    dist.destroy_process_group()
    # Leave as the product's ranks do (andy_dist.cli.run_tool): gloo's threads can outlive
    # destroy_process_group, and an interpreter torn down around them now and then aborts with
    # SIGABRT ("terminate called without an active exception"), which mp.spawn reports as a failure.
    # Everything this rank wrote is closed by now; an exception above still reaches mp.spawn as before.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def test_two_rank_cpu_run_logs_every_key_once(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_two_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    rows = strict_lines(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 1 wrote nothing
    for row in rows:
        assert set(TRAIN_KEYS) <= set(row)
        assert isinstance(row["train/mfu"], float) and 0 < row["train/mfu"] < 1.5
        assert row["train/global_batch_tokens"] == 2 * 4 * 32
    (run,) = read_offline_runs(tmp_path / "wandb")
    assert [h["step"] for h in run.history] == [1, 2, 3]
