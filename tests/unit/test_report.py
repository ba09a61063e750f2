"""tools/report.py from real run files: a short real training loop logs through MetricsLogger."""

from __future__ import annotations

import io
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from andy_dist import UserError
from andy_dist.config import model_config
from andy_dist.model import AndyLM
from andy_dist.report import PLOTS, draw, load_run, load_runs, render
from andy_dist.train.flops import MfuMeter
from andy_dist.train.metrics import MetricsLogger, memory_gb, validation_metrics
from andy_dist.train.sample_quality import sample_figures, summarize
from andy_dist.train.throughput import SpeedWindow

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def sample(model: AndyLM, tokenizer, prompt: str, new_tokens: int, temperature: float) -> dict:
    """A plain sampling loop (no KV cache): a samples.jsonl row, with the sample's quality figures."""
    model.eval()
    prompt_ids = tokenizer.encode(prompt, bos=True)
    ids = torch.tensor([prompt_ids])
    for _ in range(new_tokens):
        logits = model(ids[:, -model.cfg.max_seq_len :]).logits[0, -1] / temperature
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1)[None]], dim=1)
    new = ids[0, len(prompt_ids) :].tolist()
    row = {"prompt": prompt, "completion": tokenizer.decode(new), "temperature": temperature,
           **sample_figures(model, prompt_ids, new)}
    model.train()
    return row


def train_and_log(run_dir: Path, tokenizer, text: str, steps: int, lr: float, seq_len: int = 64, batch: int = 8,
                  eval_every: int = 10, wandb_mode: str = "disabled", seed: int = 0) -> None:
    """Train the tiny model on `text` for `steps` steps, logging every standard key as a trainer would."""
    torch.manual_seed(seed)
    split = int(len(text) * 0.9)
    train_ids = torch.tensor(tokenizer.encode(text[:split]))
    val_text = text[split:]
    val_ids = torch.tensor(tokenizer.encode(val_text))
    cfg = model_config("tiny", vocab_size=tokenizer.vocab_size, max_seq_len=seq_len, dropout=0.0)
    model = AndyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 5) * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0))))
    meter = MfuMeter(cfg, None, "cpu", torch.float32)
    speed = SpeedWindow(1, total_steps=steps, mfu_meter=meter)
    speed.start()
    started = time.perf_counter()
    config = {"model": cfg.to_dict(), "data": {"seq_len": seq_len}, "train": {"lr": lr, "steps": steps, "batch": batch}}
    best, bad, patience = math.inf, 0, 3
    with MetricsLogger(run_dir, config, is_main=True, wandb_mode=wandb_mode, total_steps=steps,
                       console_stream=io.StringIO()) as log:
        for step in range(1, steps + 1):
            start = time.perf_counter()
            offsets = torch.randint(0, len(train_ids) - seq_len - 1, (batch,))
            chunk = torch.stack([train_ids[o : o + seq_len + 1] for o in offsets])
            out = model(chunk[:, :-1], targets=chunk[:, 1:])
            opt.zero_grad()
            (out.loss_sum / out.target_tokens).backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            schedule.step()
            speed.stepped(batch * seq_len, time.perf_counter() - start, meter.step_flops([seq_len] * batch))
            log.log(step, {
                "train/loss": (out.loss_sum / out.target_tokens).item(), "train/lr": schedule.get_last_lr()[0],
                "train/grad_norm": grad_norm, **speed.read(step), "train/global_batch_seqs": batch,
                "train/global_batch_tokens": batch * seq_len, "train/padding_fraction": 0.0,
                "train/tokens_seen": batch * seq_len * step, "train/epoch": 0, "sys/memory_gb": memory_gb("cpu"),
                "time/elapsed_s": time.perf_counter() - started,
            })
            if step % eval_every == 0 or step == steps:
                model.eval()
                with torch.no_grad():
                    n = (len(val_ids) - 1) // seq_len * seq_len
                    val = model(val_ids[:n].view(-1, seq_len), targets=val_ids[1 : n + 1].view(-1, seq_len))
                model.train()
                loss = (val.loss_sum / val.target_tokens).item()
                bad = 0 if loss < best else bad + 1
                best = min(best, loss)
                val_bytes = len(tokenizer.decode(val_ids[1 : n + 1].tolist()).encode("utf-8"))
                log.log(step, validation_metrics(loss, n, val_bytes, best, bad, patience))
                rows = [sample(model, tokenizer, p, 12, 0.8) for p in ("def ", "import ")]
                log.log_samples(step, rows)
                log.log(step, summarize(rows))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokenizer, builtin_corpus):
    """Two real runs of the tiny model that differ in learning rate; the first also logs to offline W&B."""
    text = "".join(json.loads(line)["text"] for line in builtin_corpus.read_text().splitlines()[:40])[:200_000]
    root = tmp_path_factory.mktemp("runs")
    train_and_log(root / "lr-3e-3", tokenizer, text, steps=30, lr=3e-3, wandb_mode="offline")
    train_and_log(root / "lr-3e-4", tokenizer, text, steps=30, lr=3e-4, seed=1)
    return root / "lr-3e-3", root / "lr-3e-4"


def test_report_renders_plots_from_real_run_files(runs, tmp_path):
    out = tmp_path / "out" / "report.html"
    pngs = render(load_runs(runs), out)
    names = {p.stem for p in pngs}
    assert {"loss_vs_step", "loss_vs_tokens", "samples_vs_val", "sample_text", "sample_length", "lr", "grad_norm",
            "tokens_per_s", "data_wait", "mfu", "val_bpb", "memory"} == names
    page = out.read_text()
    for png in pngs:
        data = png.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000, png  # a real plot, not an empty canvas
        assert f'data-file="report_files/{png.name}"' in page and f'href="report_files/{png.name}"' in page
    assert page.count("data:image/png;base64,") == len(pngs)  # self-contained
    assert "lr-3e-3" in page and "lr-3e-4" in page
    assert "def " in page and "temperature" in page  # samples table
    assert "train.lr" in page and 'class="diff"' in page  # config, with the differing key marked
    assert "median MFU" in page and "best val loss" in page


def test_overlaid_runs_have_distinct_curves(runs, tmp_path):
    import matplotlib.image

    one, two = tmp_path / "one.png", tmp_path / "two.png"
    assert draw(PLOTS[0], load_runs(runs[:1]), one) and draw(PLOTS[0], load_runs(runs), two)
    def colours(png):
        return len({tuple(px) for px in matplotlib.image.imread(png)[::3, ::3, :3].reshape(-1, 3).round(2).tolist()})

    assert colours(two) > colours(one)  # the second run adds its own colour


def test_real_run_figures_are_plausible(runs):
    run = load_run(runs[0])
    steps, loss = run.series("train/loss")
    assert steps == list(range(1, 31))
    assert loss[-1] < loss[0] - 1.0  # it learned
    val_steps, val = run.series("val/loss")
    assert val_steps == [10, 20, 30] and all(math.isfinite(v) for v in val)
    assert run.series("train/mfu")[1] and all(0 < m < 1.5 for m in run.series("train/mfu")[1])
    assert len(run.samples) == 6 and run.wandb["mode"] == "offline"
    quality_steps, logprobs = run.series("samples/logprob")
    assert quality_steps == [10, 20, 30] and all(v < 0 for v in logprobs)
    assert all(0 < row["distinct_1"] <= 1 and row["length"] >= 11 for row in run.samples)  # per sample, too


def test_resumed_run_keeps_the_latest_value_per_step(tmp_path):
    lines = [{"step": 1, "train/loss": 5.0}, {"step": 2, "train/loss": 4.0}, {"step": 2, "train/loss": 3.5},
             {"step": 3, "train/loss": 3.0, "train/mfu": "n/a"}]
    truncated = '{"step": 4, "train/lo'
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + truncated)
    run = load_run(tmp_path)
    assert run.series("train/loss") == ([1, 2, 3], [5.0, 3.5, 3.0])
    assert run.series("train/mfu") == ([], [])
    assert run.warnings == ["metrics.jsonl: skipped an incomplete last line"]


def test_bad_run_directories(tmp_path):
    with pytest.raises(UserError, match="no such run directory"):
        load_run(tmp_path / "missing")
    with pytest.raises(UserError, match="no metrics.jsonl"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("not json\n{}\n")
    with pytest.raises(UserError, match="line 1 is not JSON"):
        load_run(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no metrics logged yet"):
        load_run(tmp_path)


def test_cli_writes_report_and_fails_in_one_line(runs, tmp_path, root):
    out = tmp_path / "cli.html"
    ok = subprocess.run([sys.executable, str(root / "tools/report.py"), *map(str, runs), "-o", str(out)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert out.is_file() and (tmp_path / "cli_files" / "loss_vs_step.png").is_file()
    bad = subprocess.run([sys.executable, str(root / "tools/report.py"), str(tmp_path / "nope"), "-o", str(out)],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no such run directory" in bad.stderr


def test_missing_metrics_are_said_not_drawn(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    rows = (json.dumps({"step": s, "train/loss": 5.0 / s}) + "\n" for s in (1, 2, 3))
    (run_dir / "metrics.jsonl").write_text("".join(rows))
    pngs = render(load_runs([run_dir]), tmp_path / "r.html")
    assert [p.stem for p in pngs] == ["loss_vs_step"]  # no tokens_seen: no loss-vs-tokens plot either
    page = (tmp_path / "r.html").read_text()
    assert "Learning rate: not logged." in page and "Model FLOPs utilization" not in page  # optional plots vanish
    assert "No samples logged." in page and "No config.json found." in page
