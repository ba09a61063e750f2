"""Checks that need a GPU: fp16 with dynamic loss scaling, the medium model within an 8 GB card.

Skipped without CUDA (see tests/conftest.py). Each runs the real launcher in one process.
"""

import json
import math

import pytest
import torch

from tests.launching import metrics, train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

INITIAL_LOSS_SCALE = 2.0**16  # andy_dist.train.engine: initial_scale_power 16, loss_scale_window 1000


def deepspeed_counters(ckpt_tag_dir) -> dict:
    """DeepSpeed's own counters, as the engine saved them: optimizer steps and overflow-skipped steps."""
    (model_file,) = ckpt_tag_dir.glob("*model_states.pt")
    saved = torch.load(model_file, map_location="cpu", weights_only=False)
    return {"global_steps": saved["global_steps"], "skipped_steps": saved["skipped_steps"]}


def test_fp16_with_dynamic_loss_scaling_trains_tiny_with_at_most_a_few_overflow_skips(train_shards, tokenizer_path,
                                                                                      tmp_path):
    """60 fp16 steps: the loss falls, every logged loss is finite, DeepSpeed's loss-scale overflows skipped
    at most 3 steps (counted by DeepSpeed itself, read from its checkpoint), and the logged loss scale agrees
    with them: untouched at 2^16 without an overflow (the 1,000-step growth window never ends in 60 steps),
    at most halved once per skipped step otherwise."""
    out = tmp_path / "run"
    train("python", ["--ds_config", "ds_configs/tiny.json", "--data", train_shards, "--tokenizer", tokenizer_path,
                     "--out", out, "--max-steps", 60, "model.vocab_size=2000", "precision=fp16", "lr=2e-3",
                     "warmup_steps=10", "log_interval=5", "sample_prompts=[]", "save_interval=1000"])
    logged = [m for m in metrics(out) if "train/loss" in m]
    assert all(isinstance(m["train/loss"], float) and math.isfinite(m["train/loss"]) for m in logged)
    assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.5
    latest = (out / "checkpoints" / "latest").read_text().strip()
    counters = deepspeed_counters(out / "checkpoints" / latest)
    assert counters["global_steps"] == 60
    skipped = counters["skipped_steps"]
    assert skipped <= 3, f"{skipped} of 60 steps skipped for fp16 overflow"
    scale = logged[-1]["train/loss_scale"]
    assert math.log2(scale).is_integer()  # dynamic scaling moves in factors of 2
    if skipped == 0:
        assert scale == INITIAL_LOSS_SCALE
    else:
        assert INITIAL_LOSS_SCALE / 2**skipped <= scale <= INITIAL_LOSS_SCALE


# A card sold as 8 GB holds 8 GiB; the CUDA context, cuBLAS workspace and the driver take about 0.75 GiB of it
# before PyTorch allocates anything, so the allocator may hold at most this much.
ALLOCATOR_BUDGET_GIB = 7.25


def test_medium_fits_an_8gb_card_at_sequence_length_512(gpu_shards_512, tokenizer_path, tmp_path):
    """The medium model from ds_configs/single_gpu_8gb.json, every batch 512 tokens wide, with evaluation and
    training samples in the run: it completes with the allocator capped at 7.25 GiB (memory_cap_gb; a larger
    request fails the run), and the most the allocator ever reserved, what the card must really hold, stays
    under that budget."""
    out = tmp_path / "run"
    train("python", ["--ds_config", "ds_configs/single_gpu_8gb.json", "--data", gpu_shards_512, "--tokenizer",
                     tokenizer_path, "--out", out, "--max-steps", 6, f"memory_cap_gb={ALLOCATOR_BUDGET_GIB}",
                     "log_interval=1", "eval_interval=3", "sample_max_new_tokens=32", "save_interval=1000"])
    logged = [m for m in metrics(out) if "train/loss" in m]
    assert [m["step"] for m in logged] == [1, 2, 3, 4, 5, 6]
    for m in logged:  # full 512-token rows (the corpus's one short last piece may be among them)
        assert m["train/global_batch_tokens"] >= 512 * (m["train/global_batch_seqs"] - 1), m
    assert [m["step"] for m in metrics(out) if "val/loss" in m] == [3, 6]
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert {r["step"] for r in rows} == {3, 6}  # generation ran in the middle of training, too
    # Steps 4-6 come after the evaluation and the samples at step 3: the peaks below cover them.
    assert max(m["sys/peak_memory_reserved_gib"] for m in logged) <= ALLOCATOR_BUDGET_GIB
    assert max(m["sys/peak_memory_gib"] for m in logged) <= max(m["sys/peak_memory_reserved_gib"] for m in logged)


@pytest.fixture(scope="module")
def gpu_shards_512(builtin_corpus, tokenizer_path, tmp_path_factory):
    """The built-in corpus as one document, cut into 512-token samples: all full but the last."""
    from andy_dist.data.shard_writer import write_shards

    base = tmp_path_factory.mktemp("shards512")
    text = "".join(json.loads(line)["text"] for line in builtin_corpus.read_text(encoding="utf-8").splitlines())
    (base / "one.jsonl").write_text(json.dumps({"text": text}) + "\n", encoding="utf-8")
    out = base / "stdlib"
    write_shards([base / "one.jsonl"], tokenizer_path, out, val_fraction=0.02, workers=1, max_seq_len=512,
                 progress=False)
    return out
