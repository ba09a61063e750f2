"""Checks that need a GPU: fp16 with dynamic loss scaling, the medium model under an 8 GiB cap.

Skipped without CUDA (see tests/conftest.py). Each runs the real launcher in one process.
"""

import math

import pytest

from tests.launching import metrics, train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_fp16_with_loss_scaling_trains_tiny_without_overflow(train_shards, tokenizer_path, tmp_path):
    out = tmp_path / "run"
    train("python", ["--ds_config", "ds_configs/tiny.json", "--data", train_shards, "--tokenizer", tokenizer_path,
                     "--out", out, "--max-steps", 60, "model.vocab_size=2000", "precision=fp16", "lr=2e-3",
                     "warmup_steps=10", "log_interval=5", "sample_prompts=[]"])
    logged = [m for m in metrics(out) if "train/loss" in m]
    assert all(isinstance(m["train/loss"], float) and math.isfinite(m["train/loss"]) for m in logged)
    assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.5
    assert logged[-1]["train/loss_scale"] >= 1.0
    # Dynamic loss scaling may skip a few early steps while it finds its scale; never a run of them.
    assert logged[-1]["train/skipped_steps"] <= 5


def test_medium_fits_an_8gb_card_at_sequence_length_512(gpu_shards_512, tokenizer_path, tmp_path):
    out = tmp_path / "run"
    train("python", ["--ds_config", "ds_configs/single_gpu_8gb.json", "--data", gpu_shards_512, "--tokenizer",
                     tokenizer_path, "--out", out, "--max-steps", 6, "memory_cap_gb=8", "log_interval=1",
                     "sample_prompts=[]", "save_interval=1000"])
    logged = [m for m in metrics(out) if "train/loss" in m]
    assert len(logged) == 6
    assert max(m["sys/peak_memory_gib"] for m in logged) < 8.0


@pytest.fixture(scope="module")
def gpu_shards_512(builtin_corpus, tokenizer_path, tmp_path_factory):
    from andy_dist.data.shard_writer import write_shards

    out = tmp_path_factory.mktemp("shards512") / "stdlib"
    write_shards([str(builtin_corpus)], tokenizer_path, out, val_fraction=0.02, workers=1, max_seq_len=512,
                 progress=False)
    return out
