"""Training config: YAML + overrides with clear errors, batch maths for every world size.

The shipped DeepSpeed configs (andy_dist.train.engine) are tests/unit/train/test_engine.py's.
"""

import pytest

from andy_dist.config import GLOBAL_BATCH_RANGE, ConfigError, load_train_config, resolve_batch


@pytest.mark.parametrize("world", [1, 2, 3, 8, 64])
@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_batch_maths_table(size, world):
    low, high = GLOBAL_BATCH_RANGE[size]
    if world > high:
        with pytest.raises(ConfigError, match=f"at most {high} ranks"):
            resolve_batch(size, world, 8)
        return
    plan = resolve_batch(size, world, 8)
    assert low <= plan.global_batch_size <= high
    assert plan.global_batch_size == plan.micro_batch_size * plan.grad_accum * world
    assert plan.micro_batch_size <= 8


def test_batch_maths_expected_values():
    assert resolve_batch("tiny", 2, 8).grad_accum == 2  # 8 x 2 x 2 = 32
    assert resolve_batch("tiny", 3, 8).global_batch_size == 48
    assert resolve_batch("medium", 1, 4).grad_accum == 2  # single_gpu_8gb: 4 x 2 = 8
    assert resolve_batch("small", 8, 8).micro_batch_size == 4  # lowered so 8 ranks fit 16-32


def test_explicit_global_batch_and_impossible_ones():
    assert resolve_batch("tiny", 2, 8, global_batch_size=64).grad_accum == 4
    with pytest.raises(ConfigError, match="outside the tiny range"):
        resolve_batch("tiny", 2, 8, global_batch_size=16)
    with pytest.raises(ConfigError, match="micro_batch_size=6 would work"):
        resolve_batch("tiny", 2, 8, global_batch_size=36)


def test_yaml_and_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1.0e-3\nwarmup_steps: 10\nsample_prompts: [Hi]\nmodel:\n  dropout: 0.0\n")
    cfg = load_train_config(str(path), ["lr=5e-4", "model.vocab_size=2000", "betas=[0.9, 0.95]"], max_steps=7)
    assert cfg.optim.lr == 5e-4 and cfg.schedule.warmup_steps == 10 and cfg.loop.max_steps == 7
    assert cfg.model == {"dropout": 0.0, "vocab_size": 2000} and cfg.optim.betas == (0.9, 0.95)
    assert cfg.samples.prompts == ("Hi",)


@pytest.mark.parametrize("override,message", [
    ("lrr=1", "unknown config keys"), ("lr=fast", "lr must be a number"), ("max_steps=2.5", "max_steps must be an integer"),
    ("model.width=3", "unknown model keys"), ("precision=fp8", "precision must be one of"), ("zero_stage=4", "zero_stage"),
    ("lr", "key=value"), ("wandb=maybe", "wandb must be"), ("stall_report_s=0", "stall_report_s must be positive"),
    ("dist_timeout_s=0", "dist_timeout_s must be at least 1")])
def test_bad_overrides_are_clear(override, message):
    with pytest.raises(ConfigError, match=message):
        load_train_config(None, [override])


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_train_config(str(tmp_path / "missing.yaml"))
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_train_config(str(tmp_path / "list.yaml"))
