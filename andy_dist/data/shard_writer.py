"""Corpus -> pre-tokenized WebDataset tar shards + manifest.json (the writing half of the data path).

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

Documents -> samples. Each input document (see `andy_dist.data.corpus`) is checked:
  * empty or whitespace-only documents are dropped and counted;
  * exact duplicates (same text, compared by a 128-bit BLAKE2 digest) are dropped and counted;
  * the rest are encoded as `BOS ids EOS`. A sequence longer than `max_seq_len` is cut into
    P = ceil(len / max_seq_len) consecutive pieces of nearly equal length (they differ by at most
    one token), so there is never a tiny tail piece. No token is dropped or repeated: BOS begins
    only the first piece and EOS ends only the last; the middle pieces start and end mid-text.

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
import json
import math
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import webdataset as wds
from tqdm import tqdm

from andy_dist import BOS_ID, EOS_ID, UserError
from andy_dist.cli import check_output_path
from andy_dist.data.corpus import Document, iter_documents, resolve_inputs, total_bytes
from andy_dist.data.tokenizer import Tokenizer

FORMAT_NAME = "andy-shards"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.model"
SPLITS = ("train", "val")
SECTION_PIECES = 16
"""A document of more pieces than this is split between train and val in sections of this many pieces."""
DEFAULT_BLOCK_TOKENS = 65536
"""Tokens per tar member (block): about 128 KiB of uint16, so one random read costs one seek."""
_CHUNK_TEXT_BYTES = 64 * 1024  # documents are sent to worker processes in chunks of about this much text


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocabularies up to 65,535 pieces), else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def lengths_name(split: str) -> str:
    return f"{split}-lengths.npy"


def block_key(index: int) -> str:
    return f"{index:08d}"


def cut_lengths(total: int, max_seq_len: int) -> list[int]:
    """Lengths of the ceil(total / max_seq_len) nearly equal consecutive pieces of a sequence."""
    pieces = max(1, math.ceil(total / max_seq_len))
    base, extra = divmod(total, pieces)
    return [base + 1] * extra + [base] * (pieces - extra)


def piece_text_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each id stands for: byte pieces 1, control pieces 0, '▁' counts as a space.

    Summed over a document's ids this equals the document's UTF-8 length, because the tokenizer is
    lossless (identity normalisation, byte fallback); `_encode_chunk` checks that for every document.
    """
    sp = tokenizer.sp
    table = np.zeros(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        if sp.is_byte(i):
            table[i] = 1
        elif sp.is_control(i) or sp.is_unknown(i):
            table[i] = 0
        else:
            table[i] = len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8"))
    return table


# ---------------------------------------------------------------------------------------------
# Encoding in worker processes


@dataclass
class _EncodedChunk:
    """The samples of a chunk of documents, packed into a few arrays (cheap to send between processes)."""

    tokens: np.ndarray  # all pieces' tokens, concatenated
    piece_lengths: np.ndarray  # (pieces,) tokens per piece
    piece_bytes: np.ndarray  # (pieces,) UTF-8 text bytes each piece covers
    doc_pieces: np.ndarray  # (docs,) pieces per document
    doc_text_tokens: np.ndarray  # (docs,) tokens per document without BOS/EOS
    doc_byte_fallback: np.ndarray  # (docs,) byte-fallback tokens per document


class _Encoder:
    """Tokenizer plus lookup tables; one per process."""

    def __init__(self, model_bytes: bytes, max_seq_len: int):
        self.tokenizer = Tokenizer(model_bytes)
        self.max_seq_len = max_seq_len
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.text_bytes = piece_text_bytes(self.tokenizer)
        self.is_byte = np.array([self.tokenizer.sp.is_byte(i) for i in range(self.tokenizer.vocab_size)])

    def encode_chunk(self, texts: Sequence[str]) -> _EncodedChunk:
        tokens, piece_lengths, piece_bytes = [], [], []
        doc_pieces, doc_text_tokens, doc_byte_fallback = [], [], []
        # One thread per process: SentencePiece would otherwise use every core in each worker,
        # and --workers would not mean what it says.
        for text, ids in zip(texts, self.tokenizer.sp.encode(list(texts), num_threads=1)):
            ids = np.asarray(ids, dtype=np.int64)
            sequence = np.concatenate([[BOS_ID], ids, [EOS_ID]])
            per_token_bytes = self.text_bytes[sequence]
            if int(per_token_bytes.sum()) != len(text.encode("utf-8")):
                raise UserError("the tokenizer does not reproduce the input text exactly (it normalises text), so "
                                "text bytes and bits per byte would be wrong; train it with tools/train_tokenizer.py")
            start = 0
            lengths = cut_lengths(len(sequence), self.max_seq_len)
            for length in lengths:
                tokens.append(sequence[start:start + length].astype(self.dtype))
                piece_bytes.append(int(per_token_bytes[start:start + length].sum()))
                start += length
            piece_lengths.extend(lengths)
            doc_pieces.append(len(lengths))
            doc_text_tokens.append(len(ids))
            doc_byte_fallback.append(int(self.is_byte[ids].sum()))
        return _EncodedChunk(
            tokens=np.concatenate(tokens) if tokens else np.zeros(0, self.dtype),
            piece_lengths=np.asarray(piece_lengths, dtype=np.int64),
            piece_bytes=np.asarray(piece_bytes, dtype=np.int64),
            doc_pieces=np.asarray(doc_pieces, dtype=np.int64),
            doc_text_tokens=np.asarray(doc_text_tokens, dtype=np.int64),
            doc_byte_fallback=np.asarray(doc_byte_fallback, dtype=np.int64),
        )


_WORKER_ENCODER: _Encoder | None = None


def _init_worker(model_bytes: bytes, max_seq_len: int) -> None:
    global _WORKER_ENCODER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_ENCODER = _Encoder(model_bytes, max_seq_len)


def _encode_in_worker(texts: list[str]) -> _EncodedChunk:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode_chunk(texts)


# ---------------------------------------------------------------------------------------------
# Reading, cleaning and splitting documents (main process, in input order)


@dataclass
class CleaningStats:
    documents_in: int = 0
    empty_dropped: int = 0
    duplicates_dropped: int = 0
    bytes_in: int = 0  # UTF-8 bytes of every input document, dropped ones included

    @property
    def documents_out(self) -> int:
        return self.documents_in - self.empty_dropped - self.duplicates_dropped


def clean_documents(documents: Iterable[Document], stats: CleaningStats) -> Iterator[str]:
    """The texts of the documents that are neither empty nor exact duplicates of an earlier one."""
    seen: set[bytes] = set()
    for doc in documents:
        data = doc.text.encode("utf-8")
        stats.documents_in += 1
        stats.bytes_in += len(data)
        if not doc.text.strip():
            stats.empty_dropped += 1
            continue
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if digest in seen:
            stats.duplicates_dropped += 1
            continue
        seen.add(digest)
        yield doc.text


def _chunks(texts: Iterable[str], progress: tqdm) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        progress.update(len(text.encode("utf-8")))
        if size >= _CHUNK_TEXT_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


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
        self._tar.write({"__key__": block_key(self._blocks_written), "lengths.npy": lengths, "tokens.npy": tokens})
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
) -> dict:
    """Tokenize the input documents into `out/` (see the module docstring); return the manifest.

    inputs: .txt/.jsonl files, directories or globs (as `andy_dist.data.corpus.resolve_inputs`).
    tokenizer: a `Tokenizer` or the path of a tokenizer.model.
    workers: encoding processes (default: every core); 1 encodes in this process.
    block_tokens: tokens per tar member; lowered automatically so a shard holds at least ~4 blocks.
    """
    if max_seq_len < 2:
        raise UserError(f"--max-seq-len must be at least 2 (BOS and one token), got {max_seq_len}")
    if shard_size_mb <= 0:
        raise UserError(f"--shard-size-mb must be positive, got {shard_size_mb}")
    if workers is None:
        workers = os.cpu_count() or 1
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers} (leave it out to use every core)")
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
    cleaning = CleaningStats()
    bar = tqdm(total=total_bytes(files), unit="B", unit_scale=True, desc="make_shards", disable=not progress,
               mininterval=1.0)
    try:
        chunks = _chunks(clean_documents(iter_documents(files), cleaning), bar)
        if workers == 1:
            encoder = _Encoder(tok.model_bytes, max_seq_len)
            encoded = map(encoder.encode_chunk, chunks)
            pool = None
        else:
            context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods()
                                                  else "spawn")
            pool = context.Pool(workers, initializer=_init_worker, initargs=(tok.model_bytes, max_seq_len))
            encoded = pool.imap(_encode_in_worker, chunks)  # ordered: output independent of worker count
        try:
            for chunk in encoded:
                _write_chunk(chunk, writers, split_rule)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        bar.close()
        manifest = _manifest(tok, dtype, max_seq_len, val_fraction, files, cleaning,
                             {split: w.finish() for split, w in writers.items()})
        if manifest["splits"]["train"]["samples"] == 0:
            raise UserError(f"no training samples: {cleaning.documents_in} document(s) in, "
                            f"{cleaning.empty_dropped} empty, {cleaning.duplicates_dropped} duplicates; "
                            f"add text to the input")
        if val_fraction > 0 and manifest["splits"]["val"]["samples"] == 0:
            raise UserError(f"the validation split is empty: --val-fraction {val_fraction} of "
                            f"{split_rule.units} document section(s) rounds to 0; raise --val-fraction "
                            f"or add documents")
        (partial / TOKENIZER_FILE).write_bytes(tok.model_bytes)
        text = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        (partial / MANIFEST).write_text(text, encoding="utf-8")  # last: its presence marks a complete set
        _replace_directory(partial, out)
    except BaseException:
        bar.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def _write_chunk(chunk: _EncodedChunk, writers: dict[str, SplitWriter], split_rule: SplitRule) -> None:
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
    lines = [
        f"documents: {s['documents_in']} in, {s['documents_out']} out "
        f"({s['empty_dropped']} empty, {s['duplicates_dropped']} duplicates dropped)",
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
