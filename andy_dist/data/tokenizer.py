"""SentencePiece BPE with the fixed special ids PAD 0, UNK 1, BOS 2, EOS 3.

Trained with byte fallback and no normalisation, so every text (English, Chinese, emoji,
odd whitespace) encodes without UNK and `decode(encode(text)) == text` exactly.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import sentencepiece as spm

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UserError
from andy_dist.cli import atomic_path, check_output_path
from andy_dist.data.corpus import Document

SPECIAL_PIECES = {"pad": "[PAD]", "unk": "[UNK]", "bos": "[BOS]", "eos": "[EOS]"}
# SentencePiece skips training sentences longer than this many bytes; we cut them instead.
MAX_SENTENCE_BYTES = 4096


# A lossless BPE: identity normalisation, spaces kept as they are, byte fallback for any character
# outside the vocabulary, newline a piece of its own; the special ids are fixed.
TRAINER_OPTIONS = dict(
    model_type="bpe",
    pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
    pad_piece=SPECIAL_PIECES["pad"], unk_piece=SPECIAL_PIECES["unk"],
    bos_piece=SPECIAL_PIECES["bos"], eos_piece=SPECIAL_PIECES["eos"],
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    user_defined_symbols=["\n"],
    max_sentence_length=MAX_SENTENCE_BYTES + 16,
    shuffle_input_sentence=True,
    minloglevel=2,
)


def split_long_line(line: str, limit: int = MAX_SENTENCE_BYTES) -> Iterator[str]:
    """Cut a line into pieces of at most `limit` UTF-8 bytes, at a space where there is one."""
    while len(line.encode("utf-8")) > limit:
        # Find the longest prefix within the byte limit (characters are 1-4 bytes).
        cut = len(line.encode("utf-8")[:limit].decode("utf-8", errors="ignore"))
        space = line.rfind(" ", 0, cut)
        if space > cut // 2:
            cut = space + 1
        yield line[:cut]
        line = line[cut:]
    if line:
        yield line


def training_sentences(documents: Iterable[Document]) -> Iterator[str]:
    """Each non-empty line of each document, long lines split. Newlines are a piece of their own."""
    for doc in documents:
        for line in doc.text.split("\n"):
            if line.strip():
                yield from split_long_line(line)


def train_tokenizer(
    documents: Iterable[Document],
    vocab_size: int,
    out_dir: str | Path,
    sample_sentences: int = 2_000_000,
    character_coverage: float = 0.9995,
    threads: int = 2,
) -> Path:
    """Train a BPE model on the documents and write out_dir/tokenizer.model and .vocab.

    SentencePiece reservoir-samples at most `sample_sentences` sentences, so memory stays bounded
    for large corpora while every document is still read once.
    """
    if vocab_size <= 4 + 256:
        raise UserError(f"--vocab-size {vocab_size} is too small: it needs the 4 special ids and 256 byte pieces")
    if sample_sentences < 1:
        raise UserError(f"--sample-sentences must be at least 1, got {sample_sentences}")
    out_dir = check_output_path(out_dir, "--out", directory=True)
    counter: dict = {"sentences": 0, "error": None}

    def counted(sentences: Iterator[str]) -> Iterator[str]:
        try:
            for sentence in sentences:
                counter["sentences"] += 1
                yield sentence
        except UserError as err:  # SentencePiece would turn it into a RuntimeError with its own text
            counter["error"] = err
            raise

    from tqdm import tqdm  # here, not at the top: reading shards needs `Tokenizer`, not this progress bar

    progress = tqdm(documents, desc="tokenizer: reading", unit="doc", mininterval=1.0)
    buffer = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=counted(training_sentences(progress)),
            model_writer=buffer,
            vocab_size=vocab_size,
            character_coverage=character_coverage,
            input_sentence_size=sample_sentences,
            num_threads=threads,
            **TRAINER_OPTIONS,
        )
    except RuntimeError as err:
        if counter["error"] is not None:
            raise counter["error"] from None
        message = str(err).strip().splitlines()[-1] if str(err).strip() else repr(err)
        if counter["sentences"] == 0:
            raise UserError("the input holds no text to train a tokenizer on (all documents are empty)") from None
        if "vocabulary size" in message.lower() or "vocab_size" in message.lower():
            raise UserError(f"--vocab-size {vocab_size} is too large for this corpus: {message}; "
                            f"lower --vocab-size or add text") from None
        raise UserError(f"SentencePiece could not train on this input: {message}") from None
    finally:
        progress.close()
    if counter["sentences"] == 0:
        raise UserError("the input holds no text to train a tokenizer on (all documents are empty)")
    if counter["error"] is not None:
        raise counter["error"]
    return _write_model(Tokenizer(buffer.getvalue()), out_dir)


def _write_model(tokenizer: "Tokenizer", out_dir: Path) -> Path:
    """out_dir/tokenizer.vocab and tokenizer.model, each complete or absent: an earlier tokenizer there is
    replaced only by a finished one."""
    with atomic_path(out_dir / "tokenizer.vocab") as tmp:
        with open(tmp, "w", encoding="utf-8") as vocab:
            for i in range(tokenizer.vocab_size):
                vocab.write(f"{tokenizer.sp.id_to_piece(i)!r}\t{tokenizer.sp.get_score(i)}\n")
    model_path = out_dir / "tokenizer.model"
    with atomic_path(model_path) as tmp:
        tmp.write_bytes(tokenizer.model_bytes)
    return model_path


class Tokenizer:
    """A loaded SentencePiece model with the project's special ids checked."""

    def __init__(self, model_bytes: bytes, source: str = "<bytes>"):
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.LoadFromSerializedProto(self.model_bytes)
        except Exception:
            raise UserError(f"{source} is not a SentencePiece model; pass the tokenizer.model "
                            f"written by tools/train_tokenizer.py") from None
        expected = {PAD_ID: SPECIAL_PIECES["pad"], UNK_ID: SPECIAL_PIECES["unk"],
                    BOS_ID: SPECIAL_PIECES["bos"], EOS_ID: SPECIAL_PIECES["eos"]}
        found = {i: self.sp.id_to_piece(i) for i in expected}
        if found != expected:
            raise UserError(f"{source} has special pieces {found}, expected {expected}; "
                            f"train it with tools/train_tokenizer.py")
        self.sha256 = hashlib.sha256(self.model_bytes).hexdigest()
        self._byte_ids = {i for i in range(self.vocab_size) if self.sp.is_byte(i)}

    @classmethod
    def from_file(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise UserError(f"tokenizer {path} does not exist; train one with tools/train_tokenizer.py")
        return cls(path.read_bytes(), source=str(path))

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def encode_batch(self, texts: Sequence[str], bos: bool = False, eos: bool = False) -> list[list[int]]:
        return [([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else []) for ids in self.sp.encode(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; PAD, BOS and EOS are dropped."""
        return self.sp.decode([int(i) for i in ids if int(i) not in (PAD_ID, BOS_ID, EOS_ID)])

    def count_byte_fallback(self, ids: Iterable[int]) -> int:
        """How many ids are byte pieces: many of them mean the tokenizer does not fit the text."""
        return sum(1 for i in ids if i in self._byte_ids)
