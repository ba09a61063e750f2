"""Corpus -> pre-tokenized WebDataset tar shards + manifest.json (the writing half of the data path).

The format (names, block keys, dtype, manifest checks) lives in `andy_dist.data.shard_format`.
Layout of a shard set `shards/NAME/`:

    train-000000.tar, train-000001.tar, ...   WebDataset tar shards of the training split
    val-000000.tar, ...                       the same for the validation split
    train-lengths.npy, val-lengths.npy        the token count of every sample, in sample-id order
    tokenizer.model                           a copy of the tokenizer (its sha256 is in the manifest), so
                                              training needs only --data; older sets lack it (pass --tokenizer)
    manifest.json                             written last: hashes, counts, statistics (see below)

Tar members. Samples are packed many per member ("blocks"): block `00000042` is the two members
`00000042.lengths.npy` (uint32, one length per sample) and `00000042.tokens.npy` (uint16, or uint32
for vocabularies above 65,535: the samples' tokens concatenated). Any WebDataset pipeline reads a
shard as a stream of blocks (`wds.tarfile_to_samples()` + `wds.decode()`); the manifest also records
the byte offset of each block's first tar header, so `andy_dist.data.shard_reader` can seek straight to one
block instead of reading through a shard. Samples are numbered 0..N-1 per split in the order they
were written; a block holds consecutive ids.

Documents -> samples. Each input document (see `andy_dist.data.corpus`) is cleaned
(`andy_dist.data.cleaning`: Unicode normalisation; empty, too short or long, letter-poor, garbled,
duplicate and near-duplicate documents are dropped, and each rule's count goes to the manifest's
`stats.dropped` and the tool's summary; the options used are the manifest's `cleaning`), and the
rest are encoded as `BOS ids EOS` and cut into pieces of at most `max_seq_len` tokens
(`andy_dist.data.encoding`: nearly equal pieces, nothing dropped or repeated).

Train/validation split: deterministic and by document. The k-th kept document goes to validation
when floor((k+1) f) > floor(k f) for the validation fraction f, which spreads exactly floor(n f)
validation documents evenly through the corpus. A very long document (more than
`SECTION_PIECES` pieces, e.g. a single-file book) is treated as several consecutive sections of
`SECTION_PIECES` pieces for this rule, so a one-document corpus still gets a validation split.

Determinism: documents are encoded in worker processes but written in input order, with fixed tar
metadata (mtime 0, fixed owner), so a rerun on the same input writes byte-identical shards whatever
the number of workers. The output is built in `NAME.partial/` and renamed into place only when the
manifest is written, so a failed run never leaves a shard set that looks complete.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from andy_dist import UserError
from andy_dist.cli import check_output_path
from andy_dist.data.cleaning import CleaningOptions, CleaningStats, clean_documents
from andy_dist.data.corpus import iter_documents, resolve_inputs, total_bytes
from andy_dist.data.encoding import EncodedChunk, encode_chunks
from andy_dist.data.shard_format import (
    FORMAT_NAME,
    FORMAT_VERSION,
    LENGTHS_MEMBER,
    MANIFEST,
    SPLITS,
    TOKENIZER_FILE,
    TOKENS_MEMBER,
    block_key,
    lengths_name,
    shard_name,
    token_dtype,
    write_manifest,
)
from andy_dist.data.tokenizer import Tokenizer

SECTION_PIECES = 16
"""A document of more pieces than this is split between train and val in sections of this many pieces."""
DEFAULT_BLOCK_TOKENS = 65536
"""Tokens per tar member (block): about 128 KiB of uint16, so one random read costs one seek."""


# ---------------------------------------------------------------------------------------------
# Reading, cleaning and splitting documents (main process, in input order)


class SplitRule:
    """Unit k goes to validation when floor((k+1) f) > floor(k f): exactly floor(n f) of n, evenly spread."""

    def __init__(self, val_fraction: float):
        if not 0.0 <= val_fraction < 1.0:
            raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
        fraction = Fraction(str(val_fraction)).limit_denominator(1_000_000)
        self.numerator, self.denominator = fraction.numerator, fraction.denominator
        self.units = 0

    def next_split(self) -> str:
        k, num, den = self.units, self.numerator, self.denominator
        self.units += 1
        return "val" if ((k + 1) * num) // den > (k * num) // den else "train"


# ---------------------------------------------------------------------------------------------
# Writing tar shards


class _HashingFile:
    """A write-only file that also computes the sha256 and size of what passes through it."""

    def __init__(self, path: Path):
        self.handle = open(path, "wb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self.handle.write(data)

    def flush(self) -> None:
        self.handle.flush()

    def close(self) -> None:
        self.handle.close()


@dataclass
class SplitStats:
    documents: int = 0  # documents with at least one sample in this split
    samples: int = 0
    tokens: int = 0  # tokens in samples, BOS/EOS included
    target_tokens: int = 0  # next-token predictions the samples hold: sum of (length - 1)
    text_tokens: int = 0  # tokens of text only (no BOS/EOS)
    text_bytes: int = 0  # UTF-8 bytes of the text the samples cover
    byte_fallback_tokens: int = 0


class SplitWriter:
    """Packs one split's samples into blocks, blocks into tar shards of about `shard_bytes`."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_bytes: int, block_tokens: int):
        self.out_dir, self.split, self.dtype = out_dir, split, dtype
        self.shard_bytes, self.block_tokens = shard_bytes, block_tokens
        self.stats = SplitStats()
        self.shards: list[dict] = []
        self.lengths: list[int] = []
        self._block: list[np.ndarray] = []
        self._block_tokens = 0
        self._blocks_written = 0
        self._tar: wds.TarWriter | None = None
        self._file: _HashingFile | None = None
        self._current: dict | None = None

    def add(self, sample: np.ndarray) -> None:
        length = len(sample)
        self._block.append(sample)
        self._block_tokens += length
        self.lengths.append(length)
        stats = self.stats
        stats.samples += 1
        stats.tokens += length
        stats.target_tokens += length - 1
        if self._block_tokens >= self.block_tokens:
            self._flush_block()

    def _open_shard(self) -> None:
        name = shard_name(self.split, len(self.shards))
        self._file = _HashingFile(self.out_dir / name)
        # Fixed owner and mtime: the tar bytes depend only on the samples.
        self._tar = wds.TarWriter(self._file, user="andy", group="andy", mtime=0.0, encoder=True)
        self._current = {"file": name, "samples": 0, "tokens": 0, "max_token_id": 0, "blocks": []}
        self.shards.append(self._current)

    def _flush_block(self) -> None:
        if not self._block:
            return
        if self._tar is None:
            self._open_shard()
        lengths = np.array([len(s) for s in self._block], dtype=np.uint32)
        tokens = np.concatenate(self._block).astype(self.dtype, copy=False)
        offset = self._tar.tarstream.offset  # where this block's first tar header starts
        self._tar.write({"__key__": block_key(self._blocks_written), LENGTHS_MEMBER: lengths, TOKENS_MEMBER: tokens})
        current = self._current
        current["blocks"].append([int(offset), len(lengths)])
        current["samples"] += len(lengths)
        current["tokens"] += int(tokens.size)
        current["max_token_id"] = max(current["max_token_id"], int(tokens.max()))
        self._blocks_written += 1
        self._block, self._block_tokens = [], 0
        if self._file.size >= self.shard_bytes:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        self._current["bytes"] = self._file.size
        self._current["sha256"] = self._file.sha256.hexdigest()
        self._tar = self._file = self._current = None

    def finish(self) -> dict:
        """Flush, close, write the lengths file; return this split's manifest entry."""
        self._flush_block()
        self._close_shard()
        lengths_path = self.out_dir / lengths_name(self.split)
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, np.asarray(self.lengths, dtype=np.uint32))
        lengths_path.write_bytes(buffer.getvalue())
        return {
            **self.stats.__dict__,
            "lengths_file": lengths_path.name,
            "lengths_sha256": hashlib.sha256(buffer.getvalue()).hexdigest(),
            "shards": self.shards,
        }


# ---------------------------------------------------------------------------------------------
# The whole job


def _check_replaceable(final: Path) -> None:
    """`final` may be written: absent, empty, or an earlier shard set (never someone else's folder)."""
    if final.exists():
        if not final.is_dir():
            raise UserError(f"--out {final} exists and is not a directory; choose another --out")
        if any(final.iterdir()) and not (final / MANIFEST).exists():
            raise UserError(f"--out {final} is a non-empty directory that is not a shard set; "
                            f"choose another --out or empty it")


def _replace_directory(partial: Path, final: Path) -> None:
    """Move `partial` to `final`, replacing an earlier shard set there."""
    if final.exists():
        _check_replaceable(final)
        old = final.with_name(f"{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(partial, final)
        shutil.rmtree(old)
    else:
        os.replace(partial, final)


def _check_options(max_seq_len: int, shard_size_mb: float, workers: int | None) -> int:
    """The options a run cannot start with; returns the number of encoding processes."""
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2 (BOS and one token), got {max_seq_len}")
    if shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be positive, got {shard_size_mb}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers} (leave it out to use every core)")
    return workers


def _check_not_empty(manifest: dict, cleaning: CleaningStats, split_rule: SplitRule, val_fraction: float) -> None:
    if manifest["splits"]["train"]["samples"] == 0:
        raise UserError(f"no training samples: {cleaning.describe()}; add text to the input"
                        + (" or loosen the cleaning options (see --help)" if cleaning.documents_out == 0 else ""))
    if val_fraction > 0 and manifest["splits"]["val"]["samples"] == 0:
        raise UserError(f"the validation split is empty: --val-fraction {val_fraction} of "
                        f"{split_rule.units} document section(s) rounds to 0; raise --val-fraction "
                        f"or add documents")


def write_shards(
    inputs: Sequence[str | Path],
    tokenizer: str | Path | Tokenizer,
    out: str | Path,
    val_fraction: float = 0.01,
    shard_size_mb: float = 64.0,
    workers: int | None = None,
    max_seq_len: int = 512,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    progress: bool = True,
    cleaning: CleaningOptions | None = None,
) -> dict:
    """Tokenize the input documents into `out/` (see the module docstring); return the manifest.

    inputs: .txt/.jsonl files, directories or globs (as `andy_dist.data.corpus.resolve_inputs`).
    tokenizer: a `Tokenizer` or the path of a tokenizer.model.
    workers: encoding processes (default: every core); 1 encodes in this process.
    block_tokens: tokens per tar member; lowered automatically so a shard holds at least ~4 blocks.
    cleaning: which documents are kept (`andy_dist.data.cleaning`; default: its documented defaults).
    """
    workers = _check_options(max_seq_len, shard_size_mb, workers)
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(tokenizer)
    split_rule = SplitRule(val_fraction)
    files = resolve_inputs([str(p) for p in inputs])
    out = check_output_path(out, "--out", directory=True)
    _check_replaceable(out)
    partial = out.with_name(out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by an interrupted run of this tool
    partial.mkdir(parents=True)

    dtype = token_dtype(tok.vocab_size)
    shard_bytes = int(shard_size_mb * 1e6)
    block_tokens = max(64, min(block_tokens, shard_bytes // (4 * dtype.itemsize)))
    writers = {split: SplitWriter(partial, split, dtype, shard_bytes, block_tokens) for split in SPLITS}
    options = cleaning or CleaningOptions()
    cleaning = CleaningStats()
    bar = tqdm(total=total_bytes(files), unit="B", unit_scale=True, desc="make_shards", disable=not progress,
               mininterval=1.0)
    try:
        texts = clean_documents(iter_documents(files), cleaning, options)
        for chunk in encode_chunks(texts, tok, max_seq_len, workers, bar):
            _write_chunk(chunk, writers, split_rule)
        bar.close()
        manifest = _manifest(tok, dtype, max_seq_len, val_fraction, files, cleaning,
                             {split: w.finish() for split, w in writers.items()})
        manifest["cleaning"] = options.to_dict()
        _check_not_empty(manifest, cleaning, split_rule, val_fraction)
        (partial / TOKENIZER_FILE).write_bytes(tok.model_bytes)
        write_manifest(partial, manifest)  # last: its presence marks a complete set
        _replace_directory(partial, out)
    except BaseException:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _write_chunk(chunk: EncodedChunk, writers: dict[str, SplitWriter], split_rule: SplitRule) -> None:
    """Append a chunk's documents to the splits, section by section, in input order."""
    # Plain Python ints: this loop runs once per piece in the main process, the serial part of the job.
    starts = np.concatenate([[0], np.cumsum(chunk.piece_lengths)]).tolist()
    piece_bytes = chunk.piece_bytes.tolist()
    text_tokens, fallback = chunk.doc_text_tokens.tolist(), chunk.doc_byte_fallback.tolist()
    first_piece = 0
    for doc, n_pieces in enumerate(chunk.doc_pieces.tolist()):
        text_tokens_by_split: dict[str, int] = {}
        for section_start in range(0, n_pieces, SECTION_PIECES):
            writer = writers[split_rule.next_split()]
            section_end = min(n_pieces, section_start + SECTION_PIECES)
            lo, hi = first_piece + section_start, first_piece + section_end
            for p in range(lo, hi):
                writer.add(chunk.tokens[starts[p]:starts[p + 1]])
            writer.stats.text_bytes += sum(piece_bytes[lo:hi])
            text = starts[hi] - starts[lo] - (section_start == 0) - (section_end == n_pieces)  # minus BOS / EOS
            text_tokens_by_split[writer.split] = text_tokens_by_split.get(writer.split, 0) + text
        # A document that straddles both splits (only very long ones) shares its byte-fallback count
        # in proportion to its text tokens; every other document goes to one split whole.
        fallback_left = fallback[doc]
        for i, (split, text) in enumerate(sorted(text_tokens_by_split.items())):
            stats = writers[split].stats
            stats.documents += 1
            stats.text_tokens += text
            last = i == len(text_tokens_by_split) - 1
            share = fallback_left if last else round(fallback[doc] * text / max(1, text_tokens[doc]))
            stats.byte_fallback_tokens += share
            fallback_left -= share
        first_piece += n_pieces


def _manifest(tok: Tokenizer, dtype: np.dtype, max_seq_len: int, val_fraction: float, files: list[Path],
              cleaning: CleaningStats, splits: dict) -> dict:
    text_tokens = sum(s["text_tokens"] for s in splits.values())
    text_bytes = sum(s["text_bytes"] for s in splits.values())
    fallback = sum(s["byte_fallback_tokens"] for s in splits.values())
    return {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "tokenizer": {"sha256": tok.sha256, "vocab_size": tok.vocab_size},
        "dtype": dtype.name,
        "max_seq_len": max_seq_len,
        "val_fraction": val_fraction,
        "section_pieces": SECTION_PIECES,
        "inputs": [{"path": str(f), "bytes": f.stat().st_size} for f in files],
        "stats": {
            "documents_in": cleaning.documents_in,
            "documents_out": cleaning.documents_out,
            "empty_dropped": cleaning.empty_dropped,
            "duplicates_dropped": cleaning.duplicates_dropped,
            "dropped": dict(cleaning.dropped),  # documents each cleaning rule dropped
            "normalized": cleaning.normalized,
            "bytes_in": cleaning.bytes_in,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "text_tokens": text_tokens,
            "text_bytes": text_bytes,
            "bytes_per_token": round(text_bytes / text_tokens, 4) if text_tokens else None,
            "byte_fallback_share": round(fallback / text_tokens, 6) if text_tokens else None,
        },
        "splits": splits,
    }


def summary(manifest: dict) -> str:
    """The tool's report: documents in/out, tokens, bytes per token, byte-fallback share, per split."""
    s = manifest["stats"]
    cleaning = CleaningStats(s["documents_in"], s["bytes_in"], s.get("normalized", 0),
                             {**CleaningStats().dropped, "empty": s["empty_dropped"],
                              "duplicate": s["duplicates_dropped"], **s.get("dropped", {})})
    lines = [
        cleaning.describe(),
        f"tokens: {s['tokens']:,} ({s['text_tokens']:,} of text), {s['bytes_per_token']} bytes/token, "
        f"byte-fallback share {100 * (s['byte_fallback_share'] or 0):.2f}%",
    ]
    for split, info in manifest["splits"].items():
        lines.append(f"{split}: {info['documents']} documents, {info['samples']:,} samples, "
                     f"{info['tokens']:,} tokens, {info['text_bytes']:,} text bytes, {len(info['shards'])} shard(s)")
    if (s["byte_fallback_share"] or 0) > 0.05:
        lines.append("warning: over 5% of tokens fell back to bytes; the tokenizer does not fit this corpus "
                     "(train it on similar text)")
    return "\n".join(lines)
