"""The artefacts every bad-input case starts from, built once per session.

Real artefacts: the session's 2,000-piece tokenizer and shards (tests/conftest.py), a second 600-piece
tokenizer with its own shards, one 2-step training run (checkpoint), its int8 export, and a random
model file made with the second tokenizer. Cases copy what they damage; nothing here is changed.
"""

from __future__ import annotations

import pytest

from tests.launching import train
from tests.reliability.bad_inputs.runner import World, run_here


@pytest.fixture(scope="session")
def world(builtin_corpus, tokenizer_path, train_shards, tmp_path_factory) -> World:
    import torch

    from andy_dist.config import ModelConfig
    from andy_dist.data.corpus import read_documents
    from andy_dist.data.shard_writer import write_shards
    from andy_dist.data.tokenizer import Tokenizer, train_tokenizer
    from andy_dist.infer.model_file import save_model_file
    from andy_dist.model import AndyLM

    base = tmp_path_factory.mktemp("bad_inputs")
    tok2 = train_tokenizer(read_documents([str(builtin_corpus)]), 600, base / "tok2")
    shards2 = base / "shards2"
    write_shards([str(builtin_corpus)], tok2, shards2, val_fraction=0.05, workers=1, max_seq_len=64, progress=False)
    run = base / "run"
    w = World(builtin_corpus, tokenizer_path, train_shards, tok2, shards2, run, base / "model.andy",
              base / "model2.andy", base)
    train("python", w.train_args(run, "--max-steps", 2), nproc=1)
    result = run_here("export", "--int8", w.ckpt, "-o", w.model)
    assert result.code == 0 and w.model.is_file(), result.err
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=600, d_model=32, n_heads=2, n_layers=1, max_seq_len=64, dropout=0.0)
    save_model_file(w.model2, AndyLM(cfg).state_dict(), cfg, Tokenizer.from_file(tok2), dtype="fp32")
    return w
