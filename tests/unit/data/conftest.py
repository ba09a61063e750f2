"""A small real shard set shared by test_shard_writer.py and test_shard_reader.py, built once per session.

Tests never change it: a test that damages a shard set works on a copy.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from andy_dist.data.corpus import read_documents
from andy_dist.data.shard_writer import write_shards
from tests.unit.data.shard_io import write_jsonl


@pytest.fixture(scope="session")
def input_texts(builtin_corpus) -> list[str]:
    """Short documents cut from the built-in corpus, one long one (several sections), an empty
    document, a whitespace-only one and two exact duplicates."""
    sources = [d.text for d in read_documents([str(builtin_corpus)])]
    short = [text[i:i + 3000] for text in sources[:8] for i in range(0, len(text), 3000)]
    texts = short[:5] + ["", "   \n", short[0], short[3]] + short[5:] + [sources[9]]
    return texts


@pytest.fixture(scope="session")
def small_input(tmp_path_factory, input_texts) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("input") / "docs.jsonl", input_texts)


@pytest.fixture(scope="session")
def shard_dir(tmp_path_factory, small_input, tokenizer) -> Path:
    out = tmp_path_factory.mktemp("shards") / "small"
    write_shards([small_input], tokenizer, out, val_fraction=0.2, shard_size_mb=0.02, workers=2,
                 max_seq_len=128, progress=False)
    return out
