"""The shard format has one home (`andy_dist.data.shard_format`), and reading shards for training
imports neither the writer nor what only the writer needs (its worker pool, tqdm).

tqdm is also imported by torch itself (`torch.hub` uses it when installed, and falls back to a stub
when it is not), so "the reader does not import tqdm" is checked by making tqdm unimportable in a
fresh interpreter: every module on the reading path must then still import and read real shards.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from andy_dist import UserError
from andy_dist.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST,
    block_key,
    lengths_name,
    read_manifest,
    shard_name,
    token_dtype,
    write_manifest,
)

WRITER_ONLY = ("andy_dist.data.shard_writer", "multiprocessing.pool", "tqdm")


def run_python(code: str, root) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_the_reader_does_not_import_the_writer_or_its_pool(root):
    proc = run_python("import sys, json\n"
                      "import andy_dist.data.shard_reader, andy_dist.data.stream\n"
                      "print(json.dumps([m for m in ('andy_dist.data.shard_writer', 'multiprocessing.pool') "
                      "if m in sys.modules]))", root)
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_shards_are_read_with_the_writer_pool_and_tqdm_unimportable(root, train_shards, tokenizer_path):
    """None in sys.modules makes `import X` fail: an import of any of them on the reading path would raise."""
    code = (f"import sys\n"
            f"for name in {WRITER_ONLY!r}:\n"
            f"    sys.modules[name] = None\n"
            f"from andy_dist.data.shard_reader import open_shards\n"
            f"from andy_dist.data.stream import ValStream\n"
            f"shards = open_shards({str(train_shards)!r}, tokenizer={str(tokenizer_path)!r}, verify='full')\n"
            f"batch = next(iter(ValStream(shards, rank=0, world_size=1, micro_batch_size=2, max_seq_len=64)))\n"
            f"print(shards.num_samples('val'), batch.num_tokens)")
    samples, tokens = map(int, run_python(code, root).stdout.split()[-2:])
    assert samples > 0 and tokens > 0


def test_names_of_the_format():
    assert (shard_name("train", 3), lengths_name("val"), block_key(42)) == ("train-000003.tar", "val-lengths.npy",
                                                                         "00000042")
    assert token_dtype(65535) == np.uint16 and token_dtype(65536) == np.uint32


def test_manifest_written_is_read_back(train_shards, tmp_path):
    manifest = read_manifest(train_shards)
    assert manifest["format"] == FORMAT_NAME and manifest["version"] == FORMAT_VERSION
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest


@pytest.mark.parametrize("damage, needle", [
    (lambda m: m.update(version=FORMAT_VERSION + 1), "format version"),
    (lambda m: m.update(format="other"), "not an andy-shards manifest"),
    (lambda m: m["splits"]["val"].pop("lengths_file"), "missing 'lengths_file'"),
])
def test_a_bad_manifest_is_named_with_the_fix(train_shards, tmp_path, damage, needle):
    manifest = read_manifest(train_shards)
    damage(manifest)
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=needle) as err:
        read_manifest(tmp_path)
    assert str(tmp_path / MANIFEST) in str(err.value) and "tools/make_shards.py" in str(err.value)
