"""DeepSpeed configs (andy_dist.train.engine): every shipped file loads and resolves; bad files are ConfigErrors.

A real engine on 1 and 2 ranks (gradient accumulation) is tested in tests/dist/test_engine.py.
"""

import json

import pytest

from andy_dist.config import ConfigError, resolve_batch
from andy_dist.train.engine import load_ds_config, model_size, resolve_ds_config
from andy_dist.train.settings import load_train_config


def test_every_shipped_ds_config_loads_and_resolves(root):
    files = sorted((root / "ds_configs").glob("*.json"))
    assert {f.name for f in files} >= {"tiny.json", "small.json", "medium.json", "single_gpu_8gb.json"}
    cfg = load_train_config()
    for path in files:
        ds, andy = load_ds_config(path)
        size = model_size(path, andy, None)
        plan = resolve_batch(size, 1, ds["train_micro_batch_size_per_gpu"])
        merged = resolve_ds_config(ds, cfg.optim, plan, precision="bf16", zero_stage=2)
        assert merged["train_batch_size"] == plan.global_batch_size
        assert "scheduler" not in merged  # the step runner sets each step's rate (andy_dist.train.lr_schedule)
        assert merged["optimizer"]["params"]["lr"] == 3e-4 and merged["optimizer"]["params"]["weight_decay"] == 0.01
        assert merged["optimizer"]["params"]["fused"] is True
        # The step runner clips and checks on the device; DeepSpeed's own clipping and checks would read back.
        assert merged["gradient_clipping"] == 0.0 and merged["zero_optimization"]["compute_grad_norm"] is False
        assert merged["bf16"] == {**ds.get("bf16", {}), "enabled": True, "check_grad_overflow": False}
        assert merged["timers"]["throughput"]["enabled"] is False, f"{path.name}: throughput timers synchronize"
        assert merged["zero_optimization"].get("overlap_comm") is not True, f"{path.name}: overlap_comm synchronizes"
    _, andy = load_ds_config(root / "ds_configs" / "single_gpu_8gb.json")
    assert andy == {"size": "medium", "activation_checkpointing": True}


def test_ds_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_ds_config(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_ds_config(tmp_path / "bad.json")
    (tmp_path / "opt.json").write_text(json.dumps({"optimizer": {"type": "Adam"}}))
    with pytest.raises(ConfigError, match="optimizer"):
        load_ds_config(tmp_path / "opt.json")
    (tmp_path / "custom.json").write_text("{}")
    with pytest.raises(ConfigError, match="--size"):
        model_size(tmp_path / "custom.json", {}, None)


def test_precision_and_stage_decide_who_clips(root):
    """bf16 without ZeRO is torch.autocast over fp32 weights; fp16 and ZeRO-3 keep DeepSpeed's clipping."""
    cfg = load_train_config()
    ds, _ = load_ds_config(root / "ds_configs" / "tiny.json")
    plan = resolve_batch("tiny", 1, 16)
    zero0 = resolve_ds_config(ds, cfg.optim, plan, precision="bf16", zero_stage=0)
    assert zero0["bf16"]["enabled"] is False and zero0["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}
    assert zero0["gradient_clipping"] == 0.0
    for precision, stage in (("fp16", 2), ("bf16", 3), ("fp32", 3)):
        merged = resolve_ds_config(ds, cfg.optim, plan, precision=precision, zero_stage=stage)
        assert merged["gradient_clipping"] == 1.0 and "compute_grad_norm" not in merged["zero_optimization"]
        assert "torch_autocast" not in merged
