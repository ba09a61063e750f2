"""Checks that need a GPU: fp16 loss scaling that really overflows, the medium model under an 8 GiB cap.

Skipped without CUDA (see tests/conftest.py). Each runs the real launcher in one process. With
ANDY_GPU_FIGURES=FILE.json set (scripts/gpu_checks.sh sets it) each test also records its figures there.
"""

import json
import math
import os
from pathlib import Path

import pytest

from andy_dist.train.checkpoint_format import load_safely
from tests.launching import ROOT, metrics, train

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def record(name: str, figures: dict) -> None:
    path = os.environ.get("ANDY_GPU_FIGURES")
    if path:
        found = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
        Path(path).write_text(json.dumps({**found, name: figures}, indent=2) + "\n")


def test_fp16_loss_scaling_skips_overflowing_steps_and_counts_them(train_shards, tokenizer_path, tmp_path):
    """Loss scaling starts at 2^32, far above what fp16 gradients can hold: DeepSpeed must skip steps and halve
    the scale until they fit. Each such skip is counted as an overflow skip (train/overflow_skips), never as a
    non-finite-loss skip (train/skipped_steps), and the run still learns."""
    ds = json.loads((ROOT / "ds_configs" / "tiny.json").read_text())
    ds["fp16"] = {"initial_scale_power": 32}
    ds_path = tmp_path / "tiny_fp16.json"
    ds_path.write_text(json.dumps(ds))
    out = tmp_path / "run"
    train("python", ["--ds_config", ds_path, "--size", "tiny", "--data", train_shards, "--tokenizer", tokenizer_path,
                     "--out", out, "--max-steps", 60, "model.vocab_size=2000", "precision=fp16", "lr=2e-3",
                     "warmup_steps=10", "log_interval=1", "sample_prompts=[]", "--wandb", "disabled"])
    logged = [m for m in metrics(out) if "train/loss" in m]
    overflow = [m["train/overflow_skips"] for m in logged]
    record("fp16_tiny", {"overflow_skips": overflow[-1], "skipped_steps": logged[-1]["train/skipped_steps"],
                         "loss_scale_first": logged[0]["train/loss_scale"],
                         "loss_scale_last": logged[-1]["train/loss_scale"],
                         "loss_first": logged[0]["train/loss"], "loss_last": logged[-1]["train/loss"]})
    assert all(math.isfinite(m["train/loss"]) for m in logged)
    assert overflow[-1] >= 10, overflow  # 2^32 -> fp16's range takes a dozen halvings or more
    assert all(b - a in (0, 1) for a, b in zip(overflow, overflow[1:])) and overflow == sorted(overflow)
    assert logged[-1]["train/skipped_steps"] == 0
    assert logged[-1]["train/loss_scale"] <= 2.0**22
    assert logged[-1]["train/loss"] < logged[0]["train/loss"] - 0.3
    # Our count is DeepSpeed's own, as the engine saved it in the final checkpoint.
    latest = (out / "checkpoints" / "latest").read_text().strip()
    (model_states,) = (out / "checkpoints" / latest).glob("*model_states.pt")
    saved = load_safely(model_states)
    assert saved["skipped_steps"] == overflow[-1] and saved["global_steps"] == 60


@pytest.fixture(scope="module")
def shards_of_512(builtin_corpus, tokenizer_path, tmp_path_factory):
    """Documents of exactly 510 tokens (BOS + 510 + EOS = one 512-token sample each): every training row is 512
    tokens, so every micro-batch is B x 512 with no padding."""
    from andy_dist.data.shard_writer import write_shards
    from andy_dist.data.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_file(tokenizer_path)
    documents = []
    for line in builtin_corpus.read_text().splitlines():
        ids = tokenizer.encode(json.loads(line)["text"])
        for start in range(0, len(ids) - 510, 510):
            text = tokenizer.decode(ids[start:start + 510]).strip()
            if len(tokenizer.encode(text)) == 510:  # decoding and encoding again may merge pieces differently
                documents.append(text)
    work = tmp_path_factory.mktemp("shards512")
    corpus = work / "docs510.jsonl"
    corpus.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in documents))
    out = work / "docs510"
    write_shards([str(corpus)], tokenizer_path, out, val_fraction=0.05, workers=1, max_seq_len=512, progress=False)
    return out


# A card sold as 8 GB holds 8 GiB; the CUDA context, cuBLAS workspace and the driver take about 0.75 GiB of it
# before PyTorch allocates anything, so the allocator may hold at most this much.
ALLOCATOR_BUDGET_GIB = 7.25


def test_medium_fits_an_8gb_card_at_sequence_length_512_with_sampling(shards_of_512, tokenizer_path, tmp_path):
    """single_gpu_8gb.json as shipped, the allocator capped at 7.25 GiB (an 8 GiB card less what the CUDA context
    takes; a larger request fails the run): 6 steps of 8 x 512 tokens (no padding), a sampling round every 3
    steps and at the final evaluation; peak *reserved* memory (what the card must hold, caching allocator
    included) stays under the budget."""
    out = tmp_path / "run"
    train("python", ["--ds_config", "ds_configs/single_gpu_8gb.json", "--data", shards_of_512, "--tokenizer",
                     tokenizer_path, "--out", out, "--max-steps", 6, f"memory_cap_gb={ALLOCATOR_BUDGET_GIB}",
                     "log_interval=1", "sample_interval=3", "save_interval=1000", "--wandb", "disabled"])
    logged = [m for m in metrics(out) if "train/loss" in m]
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines() if line.strip()]
    record("medium_8gb", {"peak_reserved_gib": max(m["sys/peak_memory_reserved_gib"] for m in logged),
                          "peak_allocated_gib": max(m["sys/peak_memory_gib"] for m in logged),
                          "tokens_per_step": logged[-1]["train/global_batch_tokens"], "samples": len(samples)})
    assert len(logged) == 6
    assert all(m["train/global_batch_tokens"] == 8 * 512 and m["train/padding_fraction"] == 0 for m in logged)
    assert {s["step"] for s in samples} >= {3, 6}
    peak_reserved = max(m["sys/peak_memory_reserved_gib"] for m in logged)
    assert peak_reserved <= ALLOCATOR_BUDGET_GIB
    assert max(m["sys/peak_memory_gib"] for m in logged) <= peak_reserved
