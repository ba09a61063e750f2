"""compile=true (torch.compile of the model inside the engine, Inductor on CPU) against eager, in real runs.

One process, the shipped tiny.json (ZeRO-1) at fp32 with dropout 0, so that the two differ only by
Inductor's fused kernels (different summation order): 20 steps each, losses equal within 1e-5 relative
(measured: 6e-8; a wrong gradient or a dropped update shows at 1e-2 within a few steps).
Resume with compile on is exact: 10 steps, stop, --resume for 10 more == 20 straight, to 1e-6.
Compilation takes 20-60 s on 2 CPU cores; Inductor's on-disk cache makes the later compiled runs quick.
"""

import pytest

from tests.launching import losses, train

pytestmark = [pytest.mark.slow]


def args(shards, tokenizer_path, out, *extra):
    return ["--ds_config", "ds_configs/tiny.json", "--data", shards, "--tokenizer", tokenizer_path, "--out", out,
            "model.vocab_size=2000", "model.dropout=0.0", "precision=fp32", "lr=2e-3", "warmup_steps=4",
            "lr_decay_steps=20", "micro_batch_size=8", "global_batch_size=32", "log_interval=1", "eval_interval=1000",
            "save_interval=10", "sample_prompts=[]", "--wandb", "disabled", *map(str, extra)]


@pytest.fixture(scope="module")
def runs(train_shards, tokenizer_path, tmp_path_factory):
    root = tmp_path_factory.mktemp("compile")
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        train("python", args(train_shards, tokenizer_path, root / name, "--max-steps", 20, *extra), nproc=1,
              timeout=900)
    return root


def test_compiled_training_follows_eager_training(runs):
    eager, compiled = losses(runs / "eager"), losses(runs / "compiled")
    assert sorted(eager) == sorted(compiled) == list(range(1, 21))
    for step in eager:
        assert compiled[step] == pytest.approx(eager[step], rel=1e-5), step
    assert compiled[20] < compiled[1] - 0.3  # it trains


def test_resume_is_exact_with_compile_on(runs, train_shards, tokenizer_path):
    out = runs / "resumed"
    train("python", args(train_shards, tokenizer_path, out, "--max-steps", 10, "compile=true"), nproc=1, timeout=900)
    result = train("python", args(train_shards, tokenizer_path, out, "--max-steps", 20, "compile=true", "--resume"),
                   nproc=1, timeout=900)
    assert "resumed from" in result.stdout and "torch.compile on" in result.stdout
    straight, resumed = losses(runs / "compiled"), losses(out)
    assert sorted(resumed) == list(range(1, 21))
    for step in range(11, 21):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-6), step
