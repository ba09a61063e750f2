"""Writing shards (tools/make_shards.py, andy_dist.data.shard_writer), read back to check the layout.

Real SentencePiece tokenizers, real tar shards read back through WebDataset and the shard reader; bad
inputs are real broken files. Damaged shard sets are test_shard_reader.py's.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UserError
from andy_dist.data.corpus import read_documents
from andy_dist.data.encoding import cut_lengths
from andy_dist.data.shard_format import MANIFEST
from andy_dist.data.shard_reader import open_shards
from andy_dist.data.shard_writer import SECTION_PIECES, SplitRule, write_shards
from andy_dist.data.tokenizer import train_tokenizer
from tests.unit.data.shard_io import all_samples, write_jsonl

CHINESE_DOCS = [
    "要有礼貌。在这种规模的项目中，很难避免遇到与你意见不和的人。",
    "善意推定：请始终假设其他人都在为这一目标而付诸努力。🙂 混合 English 与中文。",
    "学而时习之，不亦说乎？有朋自远方来，不亦乐乎？" * 30,  # long: cut into several pieces
]


def documents_from_samples(samples: list[np.ndarray]) -> list[list[int]]:
    """Re-join consecutive pieces into documents (BOS ... EOS). A section of a long document
    whose other sections are in the other split shows up as a fragment without BOS or EOS."""
    docs, current = [], []
    for sample in samples:
        ids = sample.tolist()
        if ids[0] == BOS_ID and current:
            docs.append(current)
            current = []
        current.extend(ids)
        if ids[-1] == EOS_ID:
            docs.append(current)
            current = []
    if current:
        docs.append(current)
    return docs


def kept_texts(texts: list[str]) -> list[str]:
    return list(dict.fromkeys(t for t in texts if t.strip()))


def expected_samples(texts, tokenizer, val_fraction: float, max_seq_len: int) -> dict[str, list[list[int]]]:
    """The documented layout, rebuilt from its parts: BOS text EOS cut into nearly equal pieces,
    sections of SECTION_PIECES pieces assigned to splits by the split rule, in input order."""
    rule = SplitRule(val_fraction)
    out = {"train": [], "val": []}
    for text in kept_texts(texts):
        ids = tokenizer.encode(text, bos=True, eos=True)
        pieces, start = [], 0
        for length in cut_lengths(len(ids), max_seq_len):
            pieces.append(ids[start:start + length])
            start += length
        for first in range(0, len(pieces), SECTION_PIECES):
            out[rule.next_split()].extend(pieces[first:first + SECTION_PIECES])
    return out


# --- writing ---------------------------------------------------------------------------------------


def test_cli_reports_cleaning_and_writes_manifest(tmp_path, small_input, input_texts, tokenizer_path, tokenizer,
                                                  root):
    out = tmp_path / "shards" / "cli"
    result = subprocess.run(
        [sys.executable, str(root / "tools" / "make_shards.py"), "--input", str(small_input), "--tokenizer",
         str(tokenizer_path), "--out", str(out), "--val-fraction", "0.2", "--shard-size-mb", "0.02",
         "--workers", "2", "--max-seq-len", "128"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    n_in, n_out = len(input_texts), len(kept_texts(input_texts))
    assert n_out == n_in - 4
    assert f"documents: {n_in} in, {n_out} out (2 empty, 2 duplicate dropped; 0 normalised)" in result.stdout
    assert "bytes/token" in result.stdout and "byte-fallback share" in result.stdout
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["tokenizer"] == {"sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size}
    assert manifest["dtype"] == "uint16" and manifest["max_seq_len"] == 128
    stats = manifest["stats"]
    assert stats["documents_in"] == n_in and stats["documents_out"] == n_out
    assert stats["empty_dropped"] == 2 and stats["duplicates_dropped"] == 2
    assert stats["dropped"] == {"empty": 2, "too_short": 0, "too_long": 0, "few_letters": 0, "bad_characters": 0,
                                "duplicate": 2, "near_duplicate": 0}
    assert 1.5 < stats["bytes_per_token"] < 6 and 0 <= stats["byte_fallback_share"] < 0.05
    assert len(manifest["splits"]["train"]["shards"]) > 1, "a small --shard-size-mb must give several shards"
    for split in ("train", "val"):
        info = manifest["splits"][split]
        for shard in info["shards"]:
            data = (out / shard["file"]).read_bytes()
            assert shard["sha256"] == hashlib.sha256(data).hexdigest() and shard["bytes"] == len(data)
        assert sum(s["samples"] for s in info["shards"]) == info["samples"] > 0
        assert sum(s["tokens"] for s in info["shards"]) == info["tokens"]
        assert info["target_tokens"] == info["tokens"] - info["samples"]
    assert not (tmp_path / "shards" / "cli.partial").exists()


def test_shards_are_plain_webdataset_with_many_samples_per_member(shard_dir):
    """Any WebDataset pipeline reads the shards; each member holds a block of samples."""
    manifest = json.loads((shard_dir / MANIFEST).read_text())
    urls = [str(shard_dir / s["file"]) for s in manifest["splits"]["train"]["shards"]]
    blocks = list(wds.DataPipeline(wds.SimpleShardList(urls), wds.tarfile_to_samples(), wds.decode()))
    assert all(set(b) >= {"__key__", "tokens.npy", "lengths.npy"} for b in blocks)
    assert sum(len(b["lengths.npy"]) for b in blocks) == manifest["splits"]["train"]["samples"]
    assert max(len(b["lengths.npy"]) for b in blocks) > 5
    assert all(b["tokens.npy"].dtype == np.uint16 for b in blocks)


def test_rerun_is_byte_identical_whatever_the_worker_count(tmp_path, small_input, tokenizer, shard_dir):
    again = tmp_path / "again"
    write_shards([small_input], tokenizer, again, val_fraction=0.2, shard_size_mb=0.02, workers=1,
                 max_seq_len=128, progress=False)
    first = sorted(p.name for p in shard_dir.iterdir())
    assert first == sorted(p.name for p in again.iterdir())
    for name in first:
        assert (shard_dir / name).read_bytes() == (again / name).read_bytes(), name
    # Writing over an existing shard set replaces it, with the same bytes.
    write_shards([small_input], tokenizer, again, val_fraction=0.2, shard_size_mb=0.02, workers=2,
                 max_seq_len=128, progress=False)
    assert (shard_dir / MANIFEST).read_bytes() == (again / MANIFEST).read_bytes()


def test_samples_follow_the_documented_layout(shard_dir, input_texts, tokenizer):
    """Every kept document, cut and split exactly as documented; nothing dropped or repeated."""
    shard_set = open_shards(shard_dir, tokenizer=tokenizer)
    expected = expected_samples(input_texts, tokenizer, 0.2, 128)
    for split in ("train", "val"):
        assert [s.tolist() for s in all_samples(shard_set, split)] == expected[split]


def test_pieces_are_even_with_bos_and_eos_once(shard_dir, tokenizer):
    shard_set = open_shards(shard_dir, tokenizer=tokenizer)
    samples = all_samples(shard_set, "train")
    assert max(len(s) for s in samples) == 128
    for sample in samples:
        assert PAD_ID not in sample.tolist()
        assert BOS_ID not in sample[1:].tolist() and EOS_ID not in sample[:-1].tolist()
    starts = [i for i, s in enumerate(samples) if s[0] == BOS_ID]
    for a, b in zip(starts, starts[1:] + [len(samples)]):
        lengths = [len(s) for s in samples[a:b]]
        if samples[b - 1][-1] == EOS_ID:  # a whole document in this split
            assert lengths == cut_lengths(sum(lengths), 128)  # nearly equal: they differ by at most one


def test_split_is_by_document_and_deterministic(shard_dir, input_texts, tokenizer):
    shard_set = open_shards(shard_dir, tokenizer=tokenizer)
    kept = kept_texts(input_texts)
    short = kept[:-1]  # the last document is the long one, split in sections
    train = {tuple(d) for d in documents_from_samples(all_samples(shard_set, "train")) if d[0] == BOS_ID}
    val = {tuple(d) for d in documents_from_samples(all_samples(shard_set, "val")) if d[0] == BOS_ID}
    encoded = [tuple(tokenizer.encode(t, bos=True, eos=True)) for t in short]
    # floor((k+1) f) > floor(k f) with f = 0.2 puts every fifth document (k = 4, 9, ...) in val
    assert {encoded[k] for k in range(len(short)) if k % 5 == 4} <= val
    assert {encoded[k] for k in range(len(short)) if k % 5 != 4} <= train
    assert shard_set.text_bytes("train") + shard_set.text_bytes("val") == sum(len(t.encode()) for t in kept)


def test_single_long_document_still_gets_a_validation_split(tmp_path, tokenizer, builtin_corpus):
    text = "\n".join(d.text for d in read_documents([str(builtin_corpus)]))[:120_000]
    book = tmp_path / "book.txt"
    book.write_text(text, encoding="utf-8")
    out = tmp_path / "book"
    write_shards([book], tokenizer, out, val_fraction=0.1, workers=1, max_seq_len=64, progress=False)
    shard_set = open_shards(out, tokenizer=tokenizer)
    assert shard_set.num_samples("val") > 0 and shard_set.num_samples("train") > 0
    expected = expected_samples([text], tokenizer, 0.1, 64)  # sections of 16 pieces, every 10th to val
    for split in ("train", "val"):
        assert [s.tolist() for s in all_samples(shard_set, split)] == expected[split]
    assert shard_set.text_bytes("train") + shard_set.text_bytes("val") == len(text.encode("utf-8"))


def chinese_round_trip(inputs, tokenizer, out: Path, max_seq_len: int) -> None:
    manifest = write_shards(inputs, tokenizer, out, val_fraction=0.0, workers=2, max_seq_len=max_seq_len,
                            progress=False)
    shard_set = open_shards(out, tokenizer=tokenizer, require_val=False)
    texts = list(dict.fromkeys(d.text for d in read_documents([str(p) for p in inputs]) if d.text.strip()))
    decoded = [tokenizer.decode(doc) for doc in documents_from_samples(all_samples(shard_set, "train"))]
    assert decoded == texts
    assert manifest["stats"]["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    # A tokenizer trained on Python source has few Chinese pieces: the report must show the fallback.
    assert manifest["stats"]["byte_fallback_share"] > 0.3


def test_chinese_round_trip_inline(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "zh.jsonl", CHINESE_DOCS)
    chinese_round_trip([path], tokenizer, tmp_path / "zh", max_seq_len=64)


def test_chinese_round_trip_zh_fortunes(tmp_path, zh_fortunes):
    docs = list(read_documents([str(zh_fortunes)]))
    path = write_jsonl(tmp_path / "zh.jsonl", [d.text for d in docs[:400]])
    tokenizer_path = train_tokenizer(read_documents([str(path)]), 3000, tmp_path / "tok")
    from andy_dist.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    manifest = write_shards([path], tok, tmp_path / "zh", val_fraction=0.0, workers=2, max_seq_len=96,
                            progress=False)
    shard_set = open_shards(tmp_path / "zh", tokenizer=tok, require_val=False)
    texts = list(dict.fromkeys(d.text for d in read_documents([str(path)]) if d.text.strip()))
    decoded = [tok.decode(doc) for doc in documents_from_samples(all_samples(shard_set, "train"))]
    assert decoded == texts
    assert manifest["stats"]["text_bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert manifest["stats"]["byte_fallback_share"] < 0.2  # a tokenizer trained on this text fits it


# --- failures of the writer --------------------------------------------------------------------------


def test_writer_errors_leave_no_complete_looking_output(tmp_path, tokenizer, small_input, root):
    empty = write_jsonl(tmp_path / "empty.jsonl", ["", "  "])
    with pytest.raises(UserError, match="no training samples"):
        write_shards([empty], tokenizer, tmp_path / "e", workers=1, progress=False)
    tiny = write_jsonl(tmp_path / "tiny.jsonl", ["one document", "two documents"])
    with pytest.raises(UserError, match="validation split is empty"):
        write_shards([tiny], tokenizer, tmp_path / "t", val_fraction=0.1, workers=1, progress=False)
    broken = tmp_path / "broken.jsonl"
    broken.write_text(small_input.read_text() + "{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match="broken.jsonl"):
        write_shards([broken], tokenizer, tmp_path / "b", workers=2, progress=False)
    for name in ("e", "t", "b"):
        assert not (tmp_path / name).exists() and not (tmp_path / f"{name}.partial").exists()
    # A failed rerun over an existing shard set leaves the old one intact.
    good = tmp_path / "good"
    write_shards([tiny], tokenizer, good, val_fraction=0.5, workers=1, progress=False)
    before = (good / MANIFEST).read_bytes()
    with pytest.raises(UserError):
        write_shards([broken], tokenizer, good, workers=1, progress=False)
    assert (good / MANIFEST).read_bytes() == before
    # The tool prints one line and exits 2.
    result = subprocess.run([sys.executable, str(root / "tools" / "make_shards.py"), "--input", str(broken),
                             "--tokenizer", str(tmp_path / "nope.model"), "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "nope.model" in result.stderr
