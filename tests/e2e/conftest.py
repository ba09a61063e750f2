"""Training runs shared by the end-to-end tests, each launched once per session (2 CPU ranks, tiny model).

Every run is a real `launch/train.py` under a real launcher. Between them they cover ZeRO stages 0-3 in
fp32 and in bf16, so the export tests read checkpoints the trainer itself wrote:

    fp32   zero_runs[0..3]     the same 12 steps under each stage (torchrun)
    bf16   bf16_runs[0]        2 steps, ZeRO-0
           bf16_runs[1]        ds_configs/tiny.json exactly as shipped (bf16, ZeRO-1): max_epochs=3 over
                               small shards, eval_interval = one epoch
           bf16_runs[2]        ZeRO-2, max_steps crossing two epoch boundaries, eval_interval = one epoch,
                               patience=1
           bf16_runs[3]        ZeRO-3, early stopping: min_delta=100 makes every evaluation after the first
                               "no improvement", so `best/` (step 2) is not the last checkpoint (step 4)
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.e2e.runs import TINY_GLOBAL_BATCH, Run, common, tiny_args
from tests.launching import train


@pytest.fixture(scope="session")
def small_shards(builtin_corpus, tokenizer_path, tmp_path_factory) -> tuple[Path, int]:
    """Shards of about 100 training samples of up to 64 tokens: 3 steps per epoch at the tiny global batch,
    so a run crosses epoch boundaries within a few steps. Returns (shards, steps per epoch)."""
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.shard_writer import write_shards

    base = tmp_path_factory.mktemp("small_shards")
    lines = builtin_corpus.read_text(encoding="utf-8").splitlines()
    text = "".join(json.loads(line)["text"] for line in lines[:5])[:20_000]
    (base / "small.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    out = base / "shards"
    write_shards([base / "small.jsonl"], tokenizer_path, out, val_fraction=0.2, workers=1, max_seq_len=64,
                 progress=False)
    steps_per_epoch = open_shards(out).num_samples("train") // TINY_GLOBAL_BATCH
    assert 2 <= steps_per_epoch <= 5, steps_per_epoch
    return out, steps_per_epoch


@pytest.fixture(scope="session")
def zero_runs(train_shards, tokenizer_path, tmp_path_factory) -> dict[int, Path]:
    """The same 12 steps (fp32, no dropout) under ZeRO stages 0-3, launched by torchrun."""
    runs = {}
    for stage in (0, 1, 2, 3):
        out = tmp_path_factory.mktemp(f"zero{stage}") / "run"
        train("torchrun", common(train_shards, tokenizer_path, out, "--max-steps", 12, f"zero_stage={stage}",
                                 "model.dropout=0.0", "save_interval=6", "eval_interval=100"))
        runs[stage] = out
    return runs


@pytest.fixture(scope="session")
def epochs_run(small_shards, tokenizer_path, tmp_path_factory) -> Run:
    shards, epoch = small_shards
    out = tmp_path_factory.mktemp("epochs") / "run"
    result = train("torchrun", tiny_args(shards, tokenizer_path, out, "max_epochs=3", f"eval_interval={epoch}",
                                         "lr=2e-3", "warmup_steps=2", "log_interval=1", "sample_prompts=[]",
                                         "save_interval=1000"))
    return Run(out, result.stdout, epoch)


@pytest.fixture(scope="session")
def cross_epochs_run(small_shards, tokenizer_path, tmp_path_factory) -> Run:
    shards, epoch = small_shards
    out = tmp_path_factory.mktemp("cross_epochs") / "run"
    result = train("torchrun", tiny_args(shards, tokenizer_path, out, "--max-steps", 2 * epoch + 1, "zero_stage=2",
                                         f"eval_interval={epoch}", "patience=1", "lr=2e-3", "warmup_steps=2",
                                         "log_interval=1", "sample_prompts=[]", "save_interval=1000"))
    return Run(out, result.stdout, epoch)


@pytest.fixture(scope="session")
def early_stop_run(train_shards, tokenizer_path, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("early_stop") / "run"
    result = train("torchrun", tiny_args(train_shards, tokenizer_path, out, "--max-steps", 40, "zero_stage=3",
                                         "eval_interval=2", "patience=1", "min_delta=100", "save_interval=2",
                                         "lr=2e-3", "warmup_steps=4", "lr_decay_steps=16", "log_interval=1",
                                         "sample_prompts=[]"))
    return Run(out, result.stdout)


@pytest.fixture(scope="session")
def bf16_zero0_run(train_shards, tokenizer_path, tmp_path_factory) -> Run:
    out = tmp_path_factory.mktemp("bf16_zero0") / "run"
    result = train("torchrun", tiny_args(train_shards, tokenizer_path, out, "--max-steps", 2, "zero_stage=0",
                                         "lr=2e-3", "warmup_steps=1", "sample_prompts=[]"))
    return Run(out, result.stdout)


@pytest.fixture(scope="session")
def bf16_runs(bf16_zero0_run, epochs_run, cross_epochs_run, early_stop_run) -> dict[int, Run]:
    return {0: bf16_zero0_run, 1: epochs_run, 2: cross_epochs_run, 3: early_stop_run}
