"""Export from checkpoints the trainer wrote (launch/train.py, 2 ranks), for ZeRO stages 0-3 in fp32 and in
bf16: the exported weights are exactly the optimizer's fp32 master weights, as DeepSpeed itself reads
them back, and the exported file names the real step and tag.

The masters come from DeepSpeed, not from our reader: `get_fp32_state_dict_from_zero_checkpoint` for
ZeRO 1-3, and for ZeRO-0 (which that function does not read) a DeepSpeed engine that loads the
checkpoint (scripts/engine_masters.py). The runs are conftest.py's (shared with the training tests).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from andy_dist import UserError
from andy_dist.infer.export import load_checkpoint_weights, load_logical_weights
from andy_dist.infer.model_file import load_model_file
from andy_dist.model import AndyLM
from tests.launching import ROOT, cpu_env, free_port

pytestmark = [pytest.mark.dist, pytest.mark.slow]

CASES = [(stage, precision) for precision in ("fp32", "bf16") for stage in (0, 1, 2, 3)]


@pytest.fixture(scope="module")
def checkpoints(zero_runs, bf16_runs) -> dict[tuple[int, str], object]:
    """(stage, precision) -> the run's checkpoint folder."""
    found = {(stage, "fp32"): run / "checkpoints" for stage, run in zero_runs.items()}
    found.update({(stage, "bf16"): run.checkpoints for stage, run in bf16_runs.items()})
    return found


@pytest.fixture(scope="module")
def zero0_masters(checkpoints, tmp_path_factory) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(precision, tag) -> the fp32 masters a DeepSpeed engine holds after loading the ZeRO-0 checkpoint."""
    out = tmp_path_factory.mktemp("masters")
    jobs = [(precision, tag) for precision in ("fp32", "bf16") for tag in ("latest", "best")]
    args = []
    for precision, tag in jobs:
        ckpt = checkpoints[(0, precision)]
        resolved = (ckpt / "latest").read_text().strip() if tag == "latest" else tag
        args += [str(ckpt), resolved, str(out / f"{precision}-{tag}.safetensors")]
    result = subprocess.run([sys.executable, str(ROOT / "tests/e2e/scripts/engine_masters.py"), *args],
                            env=cpu_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return {job: load_file(str(out / f"{job[0]}-{job[1]}.safetensors")) for job in jobs}


def deepspeed_masters(ckpt, tag: str) -> dict[str, torch.Tensor]:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    resolved = (ckpt / "latest").read_text().strip() if tag == "latest" else tag
    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=resolved)


@pytest.mark.parametrize("stage,precision", CASES, ids=[f"zero{s}-{p}" for s, p in CASES])
def test_export_gives_the_optimizers_fp32_masters(checkpoints, zero0_masters, stage, precision):
    ckpt = checkpoints[(stage, precision)]
    for tag in ("latest", "best"):
        state, meta = load_checkpoint_weights(ckpt, tag)
        assert meta["zero_stage"] == stage and meta["precision"] == precision and meta["world_size"] == 2
        trainer_state = json.loads((ckpt / meta["tag"] / "andy_meta.json").read_text())["trainer_state"]
        assert meta["step"] == trainer_state["step"] and meta["tag"] != "latest"  # the real step and tag
        masters = zero0_masters[(precision, tag)] if stage == 0 else deepspeed_masters(ckpt, tag)
        assert set(state) == set(masters)
        for name, master in masters.items():
            assert state[name].dtype == torch.float32
            assert torch.equal(state[name], master.float()), (tag, name)
        if precision == "bf16" and stage < 3:  # (ZeRO-3 keeps no module weights in its model files)
            model_file = next((ckpt / meta["tag"]).glob("*model_states.pt"))
            module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
            if stage == 0:  # ZeRO-0 bf16 is torch.autocast over fp32 weights: the module is the masters
                assert all(module[n].dtype == torch.float32 for n in state)
            else:
                assert any(not torch.equal(module[n].float(), state[n]) for n in state)  # not the bf16 copies


def test_export_tool_writes_a_runnable_int8_file_naming_its_step(checkpoints, tmp_path):
    ckpt = checkpoints[(3, "bf16")]  # the early-stopping run: best is step 2, the last checkpoint step 4
    env = cpu_env()
    for tag, step, name in (("best", 2, "best"), ("latest", 4, "step-000004")):
        out = tmp_path / f"{tag}.andy"
        proc = subprocess.run([sys.executable, str(ROOT / "tools/export.py"), "--int8", str(ckpt), "--tag", tag,
                               "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert f"tag {name}, step {step}" in proc.stdout
        model, tokenizer, info = load_model_file(out)
        assert info["source"]["zero_stage"] == 3 and info["source"]["tag"] == name and info["source"]["step"] == step
    state, cfg, _ = load_logical_weights(ckpt, "latest")  # what an export holds: the padded rows gone
    ids = torch.tensor([tokenizer.encode("import os", bos=True)])
    ref_model = AndyLM(cfg.replace(dropout=0.0)).eval()
    ref_model.load_state_dict(state)
    with torch.no_grad():
        ref, got = ref_model(ids).logits, model(ids).logits
    assert (got - ref).abs().max() <= 0.03 * ref.abs().max()
    bad = subprocess.run([sys.executable, str(ROOT / "tools/export.py"), "--int8", str(ckpt), "--tag", "nope",
                          "-o", str(tmp_path / "x.andy")], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "available tags" in bad.stderr and "Traceback" not in bad.stderr
    with pytest.raises(UserError, match="no 'latest' file|not in"):
        load_checkpoint_weights(tmp_path, "latest")


@pytest.fixture(scope="module")
def legacy_zero0_bf16(checkpoints, tmp_path_factory):
    """A ZeRO-0 checkpoint in the layout of DeepSpeed's bf16 wrapper (bf16 module, fp32 masters in the
    optimizer's groups, without names), written by a real engine; and the masters that engine held."""
    src = checkpoints[(0, "bf16")]
    src_tag = src / (src / "latest").read_text().strip()
    out = tmp_path_factory.mktemp("legacy")
    result = subprocess.run([sys.executable, str(ROOT / "tests/e2e/scripts/legacy_zero0_bf16.py"), str(src_tag),
                             str(out / "checkpoints"), str(out / "masters.safetensors")],
                            env=cpu_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "checkpoints", load_file(str(out / "masters.safetensors"))


def test_zero0_half_precision_masters_with_without_and_with_wrong_recorded_groups(legacy_zero0_bf16):
    """ZeRO-0 checkpoints whose module holds half-precision copies (written before the trainer ran bf16 as
    autocast, and fp16 ones) export the optimizer's fp32 masters: matched by the groups the meta records, or,
    without them, by the trainer's grouping rule; groups that do not match the file are one clear error,
    never a silent export of the half-precision copies."""
    ckpt, masters = legacy_zero0_bf16
    tag = (ckpt / "latest").read_text().strip()
    module = torch.load(next((ckpt / tag).glob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]
    assert all(module[name].dtype == torch.bfloat16 for name in masters)
    assert any(not torch.equal(module[name].float(), masters[name]) for name in masters)  # the copies differ
    state, _ = load_checkpoint_weights(ckpt, tag)
    assert set(state) == set(masters) and all(torch.equal(state[name], masters[name]) for name in masters)
    meta_path = ckpt / tag / "andy_meta.json"
    meta = json.loads(meta_path.read_text())
    groups = meta.pop("optimizer_param_groups")
    meta_path.write_text(json.dumps(meta))
    state, _ = load_checkpoint_weights(ckpt, tag)
    assert all(torch.equal(state[name], masters[name]) for name in masters)
    meta["optimizer_param_groups"] = [groups[0][1:] + groups[0][:1], groups[1]]  # same names, another order
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(UserError, match="does not round to the module's torch.bfloat16 weights"):
        load_checkpoint_weights(ckpt, tag)
