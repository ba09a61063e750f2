"""Monitoring from a real 2-rank CPU run through torchrun: metrics.jsonl, samples, offline W&B, report.

One run of 12 steps, then a resume to 16: the W&B run must continue under the same id.
"""

import json
import subprocess
import sys

import pytest

from andy_dist.train.metrics import SAMPLE_KEYS, TRAIN_KEYS, VAL_KEYS
from tests.launching import ROOT, cpu_env, metrics, train
from tests.wandb_offline import read_offline_runs

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.fixture(scope="module")
def run_dir(train_shards, tokenizer_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("monitored") / "run"
    args = ["--ds_config", "ds_configs/tiny.json", "--data", train_shards, "--tokenizer", tokenizer_path, "--out", out,
            "model.vocab_size=2000", "precision=fp32", "lr=2e-3", "warmup_steps=4", "lr_decay_steps=16",
            "log_interval=2", "eval_interval=6", "sample_interval=6", "save_interval=6", "sample_max_new_tokens=8",
            "--wandb", "offline", "wandb_tags=[ci, tiny]", "run_name=monitored"]
    env = cpu_env(WANDB_MODE="")  # the --wandb flag decides, not the environment
    train("torchrun", args + ["--max-steps", 12], env=env)
    train("torchrun", args + ["--max-steps", 16, "--resume"], env=env)
    return out


def test_metrics_jsonl_has_every_key(run_dir):
    logged = metrics(run_dir)
    training = [m for m in logged if "train/loss" in m]
    evaluations = [m for m in logged if "val/loss" in m]
    assert [m["step"] for m in training] == [1, 2, 4, 6, 8, 10, 12, 14, 16]  # 13-16 by the resumed run
    for m in training:
        missing = set(TRAIN_KEYS) - set(m)
        assert not missing, (m["step"], missing)
        assert isinstance(m["train/mfu"], float) and 0 < m["train/mfu"] < 1  # CPU: against the measured peak
        assert m["train/global_batch_seqs"] == 32
    assert [m["step"] for m in evaluations] == [6, 12, 16]
    for m in evaluations:
        assert not set(VAL_KEYS) - set(m), m
        assert m["val/bpb"] > 0 and m["val/ppl"] > 1


def test_tokens_per_s_is_the_wall_clock_between_log_lines(run_dir):
    """train/tokens_per_s is the tokens trained between two log lines over the time between them, as the
    file's own time stamps tell, evaluation, samples and checkpoints included; the compute-only figure sits
    beside it. The window after step 6 holds an evaluation, samples and a checkpoint: it is much slower on
    the wall clock than inside its steps (the trainer used to report the steps alone)."""
    training = [m for m in metrics(run_dir) if "train/loss" in m]
    # Consecutive lines of one process: the first run logs 1-12, the resumed run 14 and 16.
    pairs = [(a, b) for a, b in zip(training, training[1:]) if b["step"] <= 12 or a["step"] >= 14]
    assert len(pairs) == 7
    for a, b in pairs:
        wall = (b["train/tokens_seen"] - a["train/tokens_seen"]) / (b["time"] - a["time"])
        assert b["train/tokens_per_s"] == pytest.approx(wall, rel=0.1), (a["step"], b["step"])
        assert b["train/tokens_per_s_compute"] >= b["train/tokens_per_s"]
        assert 0 <= b["train/data_wait_fraction"] < 1
        assert b["train/mfu"] / b["train/mfu_compute"] == pytest.approx(
            b["train/tokens_per_s"] / b["train/tokens_per_s_compute"], rel=1e-6)
    after_evaluation = next(b for a, b in pairs if a["step"] == 6)
    assert after_evaluation["train/tokens_per_s"] < 0.8 * after_evaluation["train/tokens_per_s_compute"]


def test_samples_are_logged_once_per_round_with_their_quality(run_dir):
    rows = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    steps = sorted({r["step"] for r in rows})
    assert steps == [6, 12, 16]
    assert all(r["prompt"] and isinstance(r["completion"], str) for r in rows)
    assert {r["prompt"] for r in rows} == {"The ", "def main():", "First Citizen:"}
    # Steps 6 and 12 are sampling steps and evaluations: one round each, not two.
    assert len(rows) == len({(r["step"], r["prompt"]) for r in rows}) == 9
    for r in rows:
        assert r["logprob"] < 0 and 0 <= r["length"] <= 8 and r["eos"] in (0.0, 1.0)
    quality = [m for m in metrics(run_dir) if "samples/logprob" in m]
    assert [m["step"] for m in quality] == [6, 12, 16]
    for m in quality:
        assert not set(SAMPLE_KEYS) - set(m), m
        mine = [r["logprob"] for r in rows if r["step"] == m["step"]]
        assert m["samples/logprob"] == pytest.approx(sum(mine) / len(mine))


def test_offline_wandb_run_holds_keys_samples_and_continues_on_resume(run_dir):
    runs = read_offline_runs(run_dir / "wandb")
    assert len(runs) == 2, "the first run and its resumption"
    assert runs[0].run_id == runs[1].run_id == json.loads((run_dir / "wandb.json").read_text())["id"]
    assert runs[0].name == "monitored" and set(runs[0].tags) == {"ci", "tiny"}
    assert runs[0].config["model"]["d_model"] == 128 and "zero_optimization" in runs[0].config["deepspeed"]
    history = [row for run in runs for row in run.history]
    logged_keys = set().union(*history)
    expected = {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "train/mfu", "val/loss", "val/bpb",
                "train/tokens_per_s_compute", "train/data_wait_fraction", "samples/logprob", "samples/eos_fraction"}
    assert expected <= logged_keys
    tables = runs[0].tables("samples")
    assert tables and tables[0]["data"] and "completion" in tables[0]["columns"]


def test_report_renders_from_the_run(run_dir, tmp_path):
    html = tmp_path / "report.html"
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "report.py"), str(run_dir), "-o", str(html)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "report_files").glob("*.png"))
    assert len(pngs) >= 5 and all(p.stat().st_size > 1000 for p in pngs)
    text = html.read_text()
    for png in pngs:
        assert png.name in text
    assert "data:image/png;base64," in text and "First Citizen:" in text
