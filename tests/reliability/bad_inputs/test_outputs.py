"""An existing output is replaced atomically by a finished one; a crash while writing leaves it as it was.

Across the tools that write files: export, train_tokenizer, make_shards, report.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.reliability.bad_inputs.runner import copy_shards, leftovers, run_here, snapshot, write

pytestmark = [pytest.mark.slow]


def test_outputs_are_replaced_by_finished_ones(world, tmp_path):
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.tokenizer import Tokenizer
    from andy_dist.infer.model_file import load_model_file

    model = write(tmp_path / "model.andy", b"an older export")
    assert run_here("export", "--fp32", world.ckpt, "-o", model).code == 0
    assert load_model_file(model)[2]["quantization"]["scheme"] == "none"

    tok_dir = Path(shutil.copytree(world.tok.parent, tmp_path / "tok"))
    corpus = write(tmp_path / "small.txt", "".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(300)))
    assert run_here("train_tokenizer", "--input", corpus, "--vocab-size", 300, "--out", tok_dir).code == 0
    assert Tokenizer.from_file(tok_dir).vocab_size == 300

    shards = copy_shards(world.shards2, tmp_path / "set")
    result = run_here("make_shards", "--input", world.corpus, "--tokenizer", world.tok, "--out", shards,
                      "--workers", 1, "--max-seq-len", 64, "--val-fraction", 0.05)
    assert result.code == 0, result.err
    assert open_shards(shards, tokenizer=world.tok, verify="size").vocab_size == 2000

    report = write(tmp_path / "report.html", "<p>old</p>")
    assert run_here("report", world.run, "-o", report).code == 0
    assert b"<p>old</p>" not in report.read_bytes()
    assert leftovers(tmp_path) == []


def test_crash_while_writing_leaves_the_previous_output(world, tmp_path, monkeypatch):
    import andy_dist.data.shard_writer
    import andy_dist.infer.model_file
    from andy_dist.config import ModelConfig
    from andy_dist.data.tokenizer import Tokenizer
    from andy_dist.infer.export import load_checkpoint_weights

    def half_then_crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a model")
        raise RuntimeError("simulated crash in the middle of the write")

    model = write(tmp_path / "model.andy", b"the previous export")
    state, meta = load_checkpoint_weights(world.ckpt)
    monkeypatch.setattr(andy_dist.infer.model_file, "save_file", half_then_crash)
    with pytest.raises(RuntimeError, match="simulated"):
        andy_dist.infer.model_file.save_model_file(model, state, ModelConfig.from_dict(meta["model_config"]),
                                            Tokenizer.from_file(world.tok))
    assert model.read_bytes() == b"the previous export" and leftovers(tmp_path) == []

    calls = {"n": 0}
    real_write_chunk = andy_dist.data.shard_writer._write_chunk

    def crash_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while writing shards")
        return real_write_chunk(*args, **kwargs)

    shards = copy_shards(world.shards2, tmp_path / "set")
    before = snapshot(shards)
    monkeypatch.setattr(andy_dist.data.shard_writer, "_write_chunk", crash_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated"):
        andy_dist.data.shard_writer.write_shards([world.corpus], world.tok, shards, workers=1, max_seq_len=64,
                                                 progress=False)
    assert snapshot(shards) == before and leftovers(tmp_path) == []
