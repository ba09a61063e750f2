"""Opening shard sets (andy_dist.data.shard_reader): every damaged or mismatched set is a clear UserError.

Real tar shards written by the shard writer (conftest.py's `shard_dir`), damaged on a copy: truncated,
altered bytes, a smashed tar header, token ids outside the vocabulary, another tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from andy_dist import UserError
from andy_dist.data.corpus import read_documents
from andy_dist.data.shard_format import MANIFEST
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.shard_writer import write_shards
from andy_dist.data.tokenizer import train_tokenizer
from tests.unit.data.shard_io import all_samples


def copy_set(shard_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "copy"
    shutil.copytree(shard_dir, target)
    return target


# --- bad shard sets ----------------------------------------------------------------------------------


def test_missing_manifest(tmp_path, shard_dir):
    copy = copy_set(shard_dir, tmp_path)
    (copy / MANIFEST).unlink()
    with pytest.raises(UserError, match=r"manifest\.json is missing.*make_shards"):
        open_shards(copy)
    with pytest.raises(UserError, match="does not exist"):
        open_shards(tmp_path / "nowhere")


def test_truncated_shard(tmp_path, shard_dir):
    copy = copy_set(shard_dir, tmp_path)
    shard = copy / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    with pytest.raises(UserError, match=r"train-000001\.tar is truncated"):
        open_shards(copy, verify="size")


def test_corrupt_shard_sha256(tmp_path, shard_dir):
    copy = copy_set(shard_dir, tmp_path)
    shard = copy / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"train-000000\.tar is corrupt: its sha256"):
        open_shards(copy)


def rewrite_shard(copy: Path, name: str, change) -> None:
    """Apply `change` to the shard's bytes and make the manifest agree (size, sha256): only the
    full check or the reader can notice."""
    shard = copy / name
    data = change(bytearray(shard.read_bytes()))
    shard.write_bytes(bytes(data))
    manifest = json.loads((copy / MANIFEST).read_text())
    for entry in manifest["splits"]["train"]["shards"] + manifest["splits"]["val"]["shards"]:
        if entry["file"] == name:
            entry["sha256"], entry["bytes"] = hashlib.sha256(data).hexdigest(), len(data)
    (copy / MANIFEST).write_text(json.dumps(manifest))


def test_corrupt_tar_structure_found_by_full_check_and_reader(tmp_path, shard_dir):
    copy = copy_set(shard_dir, tmp_path)

    def smash_second_header(data):
        offset = json.loads((copy / MANIFEST).read_text())["splits"]["train"]["shards"][0]["blocks"][1][0]
        data[offset:offset + 512] = b"\x07" * 512
        return data

    rewrite_shard(copy, "train-000000.tar", smash_second_header)
    with pytest.raises(UserError, match=r"train-000000\.tar"):
        open_shards(copy, verify="full")
    shard_set = open_shards(copy, verify="sha256")  # hashes agree: only reading can tell
    with pytest.raises(UserError, match=r"train-000000\.tar is corrupt"):
        shard_set.reader("train").read(np.arange(shard_set.num_samples("train")))


def test_token_ids_outside_the_vocabulary(tmp_path, shard_dir, tokenizer):
    copy = copy_set(shard_dir, tmp_path)

    def bad_token(data):
        stream = io.BytesIO()
        np.lib.format.write_array(stream, np.zeros(1, np.uint16))
        header = len(stream.getvalue()) - 2
        first = json.loads((copy / MANIFEST).read_text())["splits"]["train"]["shards"][0]["blocks"]
        # the second member of block 0 is tokens.npy: find its data and set the first token to 65000
        tar = wds.tariterators.tarfile.open(fileobj=io.BytesIO(bytes(data)))
        member = tar.getmembers()[1]
        assert member.name.endswith("tokens.npy") and first[0][0] == 0
        data[member.offset_data + header:member.offset_data + header + 2] = np.uint16(65000).tobytes()
        return data

    rewrite_shard(copy, "train-000000.tar", bad_token)
    with pytest.raises(UserError, match=r"train-000000\.tar block 00000000 holds token id 65000"):
        open_shards(copy, verify="full")
    shard_set = open_shards(copy, verify="sha256")
    with pytest.raises(UserError, match=r"train-000000\.tar holds token id 65000"):
        shard_set.reader("train").read([0])


def test_shards_made_with_another_tokenizer(tmp_path, shard_dir, tokenizer, builtin_corpus):
    other = train_tokenizer(read_documents([str(builtin_corpus)]), 500, tmp_path / "other")
    with pytest.raises(UserError, match="different tokenizer"):
        open_shards(shard_dir, tokenizer=other)
    with pytest.raises(UserError, match="model has vocab_size 500"):
        open_shards(shard_dir, vocab_size=500)
    assert open_shards(shard_dir, tokenizer=tokenizer, vocab_size=tokenizer.vocab_size).vocab_size == 2000


def test_empty_split(tmp_path, tokenizer, small_input):
    out = tmp_path / "noval"
    write_shards([small_input], tokenizer, out, val_fraction=0.0, workers=1, progress=False)
    with pytest.raises(UserError, match="val split is empty"):
        open_shards(out)
    assert open_shards(out, require_val=False).num_samples("val") == 0


def test_manifest_counts_match_what_is_read(shard_dir):
    shard_set = open_shards(shard_dir, verify="full")
    for split in ("train", "val"):
        samples = all_samples(shard_set, split)
        assert len(samples) == shard_set.num_samples(split)
        assert sum(len(s) for s in samples) == shard_set.tokens(split)
        assert np.array_equal([len(s) for s in samples], shard_set.lengths(split))
        assert math.isclose(shard_set.target_tokens(split), shard_set.tokens(split) - len(samples))
