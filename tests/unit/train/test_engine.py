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
        merged = resolve_ds_config(ds, cfg.optim, cfg.schedule, plan, total_steps=5000, precision="bf16", zero_stage=2)
        assert merged["train_batch_size"] == plan.global_batch_size
        assert merged["scheduler"]["params"]["warmup_type"] == "linear"
        assert merged["scheduler"]["params"]["warmup_num_steps"] == 1000
        assert merged["optimizer"]["params"]["lr"] == 3e-4 and merged["optimizer"]["params"]["weight_decay"] == 0.01
        assert merged["gradient_clipping"] == 1.0
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
