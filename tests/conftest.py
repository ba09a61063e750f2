"""Shared fixtures: real SentencePiece models and corpora, built once per test session.

Everything here works on a fresh clone: the built-in corpus is the Python standard library's
source. The real corpora in ../shared/corpora are used where present (fixtures skip otherwise).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_CORPORA = ROOT.parent / "shared" / "corpora"
sys.path.insert(0, str(ROOT))

# Keep the 2-core CI machine responsive when several processes run at once.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # on a GPU machine DeepSpeed keeps its CUDA accelerator


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip_gpu = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def builtin_corpus(tmp_path_factory) -> Path:
    """About 1 MB of Python standard library source, as .jsonl (one file per document)."""
    from andy_dist.data.corpus import write_default_corpus

    return write_default_corpus(tmp_path_factory.mktemp("corpus") / "stdlib.jsonl", max_bytes=1_000_000)


@pytest.fixture(scope="session")
def tokenizer_path(builtin_corpus, tmp_path_factory) -> Path:
    """A real 2,000-piece BPE tokenizer trained on the built-in corpus."""
    from andy_dist.data.corpus import read_documents
    from andy_dist.data.tokenizer import train_tokenizer

    return train_tokenizer(read_documents([str(builtin_corpus)]), 2000, tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path):
    from andy_dist.data.tokenizer import Tokenizer

    return Tokenizer.from_file(tokenizer_path)


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    path = SHARED_CORPORA / "tinyshakespeare.txt"
    if not path.exists():
        pytest.skip("../shared/corpora/tinyshakespeare.txt is absent (fresh clone without shared/)")
    return path


@pytest.fixture(scope="session")
def zh_fortunes() -> Path:
    path = SHARED_CORPORA / "zh_fortunes.jsonl"
    if not path.exists():
        pytest.skip("../shared/corpora/zh_fortunes.jsonl is absent (fresh clone without shared/)")
    return path


@pytest.fixture(scope="session")
def train_shards(builtin_corpus, tokenizer_path, tmp_path_factory) -> Path:
    """Real WebDataset shards of the built-in corpus, samples cut at 64 tokens so CPU steps are quick."""
    from andy_dist.data.shard_writer import write_shards

    out = tmp_path_factory.mktemp("shards") / "stdlib"
    write_shards([str(builtin_corpus)], tokenizer_path, out, val_fraction=0.05, workers=1, max_seq_len=64,
                 progress=False)
    return out


@pytest.fixture(scope="session")
def trained_tiny(builtin_corpus, tokenizer):
    """A small AndyLM (d 64, 2 layers, vocab 2,000) trained 200 steps on the built-in corpus's paragraphs,
    with its untrained weights and held-out paragraphs (tests/tiny_training.py)."""
    from tests.tiny_training import train_tiny

    return train_tiny(builtin_corpus, tokenizer)
