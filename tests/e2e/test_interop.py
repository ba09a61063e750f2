"""Interop end to end with real DeepSpeed runs, through the installed console commands.

One 6-step run (`andy-train`, one process, --data only: the shards carry their tokenizer) saves step-2/4/6 and
best; `andy-export --hf` turns its checkpoint into a directory transformers loads with equal logits; weight
averaging exports the exact mean of the checkpoints; and `andy-train init_from=` starts a bf16 ZeRO-1 run
from a GPT-2 made by transformers, whose learned position table comes out of training exactly as given.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from andy_dist.infer.export import load_logical_weights
from tests.launching import ROOT, cpu_env

pytestmark = [pytest.mark.slow]
transformers = pytest.importorskip("transformers")


def command(name: str, *args, timeout: int = 600) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        pytest.skip(f"{name} is not installed (pip install -e .)")
    result = subprocess.run([str(exe), *map(str, args)], cwd=ROOT, env=cpu_env(), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def train_args(shards, out, *extra) -> list:
    return ["--ds_config", ROOT / "ds_configs/tiny.json", "--data", shards, "--out", out, "model.vocab_size=2000",
            "model.d_model=32", "precision=fp32", "sample_prompts=[]", "wandb=disabled", "warmup_steps=1",
            "log_interval=1", *extra]


@pytest.fixture(scope="module")
def run(train_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("interop") / "run"
    command("andy-train", *train_args(train_shards, out, "--max-steps", 6, "save_interval=2", "keep_last=3",
                                      "eval_interval=3"))
    return out


def test_the_run_took_its_tokenizer_from_the_shards(run, train_shards):
    assert (run / "checkpoints" / "tokenizer.model").read_bytes() == (train_shards / "tokenizer.model").read_bytes()


def test_hf_export_of_a_checkpoint_gives_our_logits(run, tmp_path, builtin_corpus):
    from andy_dist.data.tokenizer import Tokenizer
    from andy_dist.model import AndyLM

    out = tmp_path / "hf"
    printed = command("andy-export", "--hf", out, run / "checkpoints", "--tag", "best").stdout
    assert "Hugging Face GPT-2 format" in printed
    state, cfg, meta = load_logical_weights(run / "checkpoints", "best")  # as exported: no padded rows
    ours = AndyLM(cfg.replace(dropout=0.0)).eval()
    ours.load_state_dict(state)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    text = json.loads(builtin_corpus.read_text().splitlines()[5])["text"][:2000]
    ids = torch.tensor([Tokenizer.from_file(run / "checkpoints" / "tokenizer.model").encode(text, bos=True)[:300]])
    with torch.no_grad():
        assert (hf(ids).logits - ours(ids).logits).abs().max() < 1e-5
    card = (out / "README.md").read_text()
    best = meta["trainer_state"]["best_val_loss"]
    assert f"{best:.4f}" in card and str(meta["data"]) in card and "fp32, ZeRO stage 1 on 1 rank(s)" in card


def test_weight_averaging_exports_the_mean_of_the_checkpoints(run, tmp_path):
    from safetensors.torch import load_file

    from andy_dist.commands.export import main as export_main
    from andy_dist.infer.export import load_logical_weights
    from andy_dist.infer.model_file import read_float_weights

    ckpt = run / "checkpoints"
    members = [load_logical_weights(ckpt, tag)[0] for tag in ("step-000002", "step-000004", "step-000006")]
    assert export_main(["--fp32", str(ckpt), "--average", "step-000002", "step-000004", "step-000006",
                        "-o", str(tmp_path / "avg.andy")]) == 0
    averaged, _, _, info = read_float_weights(tmp_path / "avg.andy")
    assert info["source"]["averaged_tags"] == ["step-000002", "step-000004", "step-000006"]
    for name, tensor in averaged.items():
        mean = torch.stack([m[name].double() for m in members]).mean(0).float()
        assert torch.equal(tensor, mean), name
    assert not torch.equal(averaged["blocks.0.attn.qkv.weight"], members[-1]["blocks.0.attn.qkv.weight"])
    assert export_main(["--hf", str(tmp_path / "hf"), str(ckpt), "--average-last", "2"]) == 0
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    mean = (members[1]["blocks.1.ffn.fc.weight"].double() + members[2]["blocks.1.ffn.fc.weight"].double()) / 2
    assert torch.equal(hf["transformer.h.1.mlp.c_fc.weight"], mean.float().t())
    assert "weights averaged over step-000004, step-000006" in (tmp_path / "hf" / "README.md").read_text()


@pytest.fixture(scope="module")
def gpt2_dir(train_shards, tmp_path_factory) -> tuple:
    """A GPT-2 built by transformers with a learned (random) position table, saved with our tokenizer."""
    torch.manual_seed(5)
    config = transformers.GPT2Config(vocab_size=2000, n_positions=1024, n_embd=32, n_layer=2, n_head=2,
                                     activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 0.3)
    directory = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model.save_pretrained(str(directory))
    shutil.copy(train_shards / "tokenizer.model", directory)
    return model, directory


def test_training_from_a_gpt2_keeps_its_position_table_exactly(gpt2_dir, train_shards, tmp_path):
    from andy_dist.infer.hf_format import from_hf_state
    from andy_dist.infer.hf_import import import_hf_model

    model, directory = gpt2_dir
    out = tmp_path / "ft"
    dry = command("andy-train", *train_args(train_shards, out, f"init_from={directory}", "--dry-run"))
    assert "vocab 2000, d 32, 2 heads, 2 layers" in dry.stdout
    args = train_args(train_shards, out, f"init_from={directory}", "--max-steps", 3, "lr=1e-3", "eval_interval=100")
    args[args.index("precision=fp32")] = "precision=bf16"  # DeepSpeed keeps buffers fp32: the table stays exact
    command("andy-train", *args)
    state, _, meta = load_logical_weights(out / "checkpoints", "latest")
    assert meta["model_config"]["position_table"] == "stored" and meta["model_config"]["activation"] == "gelu_tanh"
    assert torch.equal(state["positions"], model.transformer.wpe.weight[:512])  # frozen, exactly as given
    imported = import_hf_model(directory)
    start = from_hf_state({k: v for k, v in model.state_dict().items()}, imported.cfg, "gpt2")
    moved = 0
    for name, tensor in state.items():  # trained from the given weights (bf16-rounded): near them after one
        assert (tensor - start[name]).abs().max() < 5e-3, name  # AdamW step of 5e-4 (warmup makes two lr 0)
        moved += not torch.equal(tensor, start[name])
    assert moved == len(state) - 1  # all but the position table
