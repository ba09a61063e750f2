"""Training settings (andy_dist.train.settings): YAML + overrides, flat and grouped names, clear errors."""

import pytest

from andy_dist.config import ConfigError
from andy_dist.train.settings import load_train_config


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nwarmup_steps: 10\nsample_prompts: [Hi]\nmodel:\n  dropout: 0.0\n")
    cfg = load_train_config(str(path), ["lr=5e-4", "model.vocab_size=2000", "betas=[0.9, 0.95]"], max_steps=7)
    assert cfg.optim.lr == 5e-4 and cfg.schedule.warmup_steps == 10 and cfg.loop.max_steps == 7
    assert cfg.model == {"dropout": 0.0, "vocab_size": 2000} and cfg.optim.betas == (0.9, 0.95)
    assert cfg.samples.prompts == ("Hi",)


@pytest.mark.parametrize("override,message", [
    ("lrr=1", "unknown config keys"), ("lr=fast", "lr must be a number"),
    ("max_steps=2.5", "max_steps must be an integer"), ("model.width=3", "unknown model keys"),
    ("precision=fp8", "precision must be one of"), ("zero_stage=4", "zero_stage"),
    ("lr", "key=value"), ("wandb=maybe", "wandb must be"), ("stall_report_s=0", "stall_report_s must be positive"),
    ("dist_timeout_s=0", "dist_timeout_s must be at least 1"), ("data_verify=always", "data_verify must be one of"),
    ("cache_max_gb=0", "cache_max_gb must be positive"), ("fetch_retries=0", "fetch_retries >= 1")])
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(str(tmp_path / "list.yaml"))


def test_group_names_and_nested_yaml_reach_the_same_settings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim:\n  lr: 2.0e-3\nsamples:\n  prompts: [Hi]\nwarmup_steps: 7\n")
    cfg = load_train_config(str(path), ["schedule.min_lr_ratio=0.2", "sample_top_k=5", "loop.patience=9"])
    assert (cfg.optim.lr, cfg.samples.prompts, cfg.schedule.warmup_steps) == (2e-3, ("Hi",), 7)
    assert (cfg.schedule.min_lr_ratio, cfg.samples.top_k, cfg.loop.patience) == (0.2, 5, 9)
    flat = cfg.flat()
    assert flat["lr"] == 2e-3 and flat["sample_prompts"] == ["Hi"] and flat["patience"] == 9
    back = tmp_path / "flat.yaml"  # what W&B and the report show reads back as the same settings
    import yaml

    back.write_text(yaml.safe_dump(flat))
    assert load_train_config(str(back)) == cfg
    with pytest.raises(ConfigError, match="unknown config key optim.lrr"):
        load_train_config(None, ["optim.lrr=1"])


def test_activation_checkpointing_is_a_training_setting_and_old_model_configs_still_load():
    from andy_dist.config import ModelConfig

    cfg = load_train_config(None, ["activation_checkpointing=true"])
    assert cfg.engine.activation_checkpointing is True
    old = {"vocab_size": 300, "d_model": 32, "n_heads": 2, "n_layers": 2, "activation_checkpointing": True}
    assert ModelConfig.from_dict(old) == ModelConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2)


def test_data_access_settings_default_to_a_start_that_does_not_read_the_dataset():
    cfg = load_train_config(None, ["cache_dir=/local/cache", "cache_max_gb=2.5", "data.prefetch_shards=8"])
    assert cfg.data.data_verify == "once" and cfg.data.cache_dir == "/local/cache"
    assert cfg.data.cache_max_gb == 2.5 and cfg.data.prefetch_shards == 8 and cfg.data.fetch_retries == 5
