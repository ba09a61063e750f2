"""Documents -> samples: tokenized as `BOS ids EOS`, cut into pieces of at most max_seq_len tokens.

A sequence longer than `max_seq_len` is cut into P = ceil(len / max_seq_len) consecutive pieces of
nearly equal length (they differ by at most one token), so there is never a tiny tail piece. No
token is dropped or repeated: BOS begins only the first piece and EOS ends only the last. Encoding
runs in worker processes (`encode_chunks`), chunk by chunk, and the results come back in input order.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import numpy as np
from tqdm import tqdm

from andy_dist import BOS_ID, EOS_ID, UserError
from andy_dist.data.shard_format import token_dtype
from andy_dist.data.tokenizer import Tokenizer

CHUNK_TEXT_BYTES = 64 * 1024  # documents are sent to worker processes in chunks of about this much text


def cut_lengths(total: int, max_seq_len: int) -> list[int]:
    """Lengths of the ceil(total / max_seq_len) nearly equal consecutive pieces of a sequence."""
    pieces = max(1, math.ceil(total / max_seq_len))
    base, extra = divmod(total, pieces)
    return [base + 1] * extra + [base] * (pieces - extra)


def piece_text_bytes(tokenizer: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of text each id stands for: byte pieces 1, control pieces 0, '▁' counts as a space.

    Summed over a document's ids this equals the document's UTF-8 length, because the tokenizer is
    lossless (identity normalisation, byte fallback); `Encoder.encode_chunk` checks that for every document.
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


@dataclass
class EncodedChunk:
    """The samples of a chunk of documents, packed into a few arrays (cheap to send between processes)."""

    tokens: np.ndarray  # all pieces' tokens, concatenated
    piece_lengths: np.ndarray  # (pieces,) tokens per piece
    piece_bytes: np.ndarray  # (pieces,) UTF-8 text bytes each piece covers
    doc_pieces: np.ndarray  # (docs,) pieces per document
    doc_text_tokens: np.ndarray  # (docs,) tokens per document without BOS/EOS
    doc_byte_fallback: np.ndarray  # (docs,) byte-fallback tokens per document


class Encoder:
    """Tokenizer plus lookup tables; one per process."""

    def __init__(self, model_bytes: bytes, max_seq_len: int):
        self.tokenizer = Tokenizer(model_bytes)
        self.max_seq_len = max_seq_len
        self.dtype = token_dtype(self.tokenizer.vocab_size)
        self.text_bytes = piece_text_bytes(self.tokenizer)
        self.is_byte = np.array([self.tokenizer.sp.is_byte(i) for i in range(self.tokenizer.vocab_size)])

    def encode_chunk(self, texts: Sequence[str]) -> EncodedChunk:
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
        return EncodedChunk(
            tokens=np.concatenate(tokens) if tokens else np.zeros(0, self.dtype),
            piece_lengths=np.asarray(piece_lengths, dtype=np.int64),
            piece_bytes=np.asarray(piece_bytes, dtype=np.int64),
            doc_pieces=np.asarray(doc_pieces, dtype=np.int64),
            doc_text_tokens=np.asarray(doc_text_tokens, dtype=np.int64),
            doc_byte_fallback=np.asarray(doc_byte_fallback, dtype=np.int64),
        )


_WORKER_ENCODER: Encoder | None = None


def _init_worker(model_bytes: bytes, max_seq_len: int) -> None:
    global _WORKER_ENCODER
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    _WORKER_ENCODER = Encoder(model_bytes, max_seq_len)


def _encode_in_worker(texts: list[str]) -> EncodedChunk:
    assert _WORKER_ENCODER is not None
    return _WORKER_ENCODER.encode_chunk(texts)


def _chunks(texts: Iterable[str], progress: tqdm) -> Iterator[list[str]]:
    chunk, size = [], 0
    for text in texts:
        chunk.append(text)
        size += len(text)
        progress.update(len(text.encode("utf-8")))
        if size >= CHUNK_TEXT_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk




def encode_chunks(texts: Iterable[str], tokenizer: Tokenizer, max_seq_len: int, workers: int,
                  progress: tqdm) -> Iterator[EncodedChunk]:
    """The encoded chunks of `texts`, in input order, from `workers` processes (1: in this process)."""
    chunks = _chunks(texts, progress)
    if workers == 1:
        yield from map(Encoder(tokenizer.model_bytes, max_seq_len).encode_chunk, chunks)
        return
    context = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    pool = context.Pool(workers, initializer=_init_worker, initargs=(tokenizer.model_bytes, max_seq_len))
    try:
        yield from pool.imap(_encode_in_worker, chunks)  # ordered: output independent of worker count
    finally:
        pool.terminate()
        pool.join()
