"""The on-disk shard format, in one place: file names, block keys, token dtype, the manifest.

Written by `andy_dist.data.shard_writer` (see its docstring for how samples are made), read by
`andy_dist.data.shard_reader`. Layout of a shard set `shards/NAME/`:

    train-000000.tar, ...       WebDataset tar shards; block `00000042` is the two members
                                `00000042.lengths.npy` (uint32) and `00000042.tokens.npy` (`token_dtype`)
    val-000000.tar, ...         the same for the validation split
    train-lengths.npy, ...      every sample's token count, in sample-id order
    tokenizer.model             a copy of the tokenizer (its sha256 is in the manifest), so training needs
                                only --data; sets made before this copy existed lack it (pass --tokenizer)
    manifest.json               written last (its presence marks a complete set): format name and
                                version, tokenizer, dtype, counts, and per shard its size, sha256 and
                                the byte offset and sample count of every block

This module needs neither the writer nor multiprocessing, so reading shards for training does not
import them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from andy_dist import UserError

FORMAT_NAME = "andy-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
LENGTHS_MEMBER = "lengths.npy"
TOKENS_MEMBER = "tokens.npy"
REMAKE = "re-create the shard set with tools/make_shards.py"
"""The fix for any damaged or outdated shard set, appended to its error messages."""

# What a manifest must hold for the reader (the writer writes more: inputs, statistics).
_SPLIT_KEYS = ("samples", "tokens", "target_tokens", "text_bytes", "documents", "lengths_file", "shards")
_SHARD_KEYS = ("file", "samples", "tokens", "sha256", "bytes", "max_token_id", "blocks")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies up to 65,535 pieces), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def lengths_name(split: str) -> str:
    return f"{split}-lengths.npy"


def block_key(index: int) -> str:
    return f"{index:08d}"


def write_manifest(directory: Path, manifest: dict) -> None:
    """Write `directory`'s manifest; call it last, since its presence marks the set complete."""
    text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
    (Path(directory) / MANIFEST).write_text(text, encoding="utf-8")


def read_manifest(directory: Path) -> dict:
    """`directory`'s manifest, checked for format, version and every key the reader uses.

    Each problem is a `UserError` naming the file and the fix (a missing directory, an unfinished
    make_shards run, invalid JSON, another format or version, a missing key)."""
    directory = Path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        hint = ""
        if directory.with_name(directory.name + ".partial").exists():
            hint = f" ({directory.name}.partial exists: an earlier make_shards run did not finish)"
        if not directory.exists():
            raise UserError(f"shard directory {directory} does not exist; make it with tools/make_shards.py "
                            f"--out {directory}{hint}")
        raise UserError(f"{path} is missing{hint}; {REMAKE} --out {directory}")
    return manifest_from_bytes(path.read_bytes(), str(path))


def manifest_from_bytes(data: bytes, path: str) -> dict:
    """A manifest's bytes (read from `path`, a file or a URL), checked as `read_manifest` says."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {REMAKE}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not an andy-shards manifest; {REMAKE}")
    if manifest.get("version") != FORMAT_VERSION:
        raise UserError(f"{path} has format version {manifest.get('version')}, this code reads "
                        f"{FORMAT_VERSION}; {REMAKE}")
    try:
        for key in ("sha256", "vocab_size"):
            manifest["tokenizer"][key]
        for split in SPLITS:
            entry = manifest["splits"][split]
            for key in _SPLIT_KEYS:
                entry[key]
            for shard in entry["shards"]:
                for key in _SHARD_KEYS:
                    shard[key]
        np.dtype(manifest["dtype"]), int(manifest["max_seq_len"])
    except (KeyError, TypeError) as err:
        raise UserError(f"{path} is malformed (missing {err}); {REMAKE}") from None
    return manifest
