"""Which documents are kept, and in what form: one cleaning pass shared by tokenizer training and shard writing.

Every document goes through these steps in order; the first rule that drops it is counted:

1. Unicode normalisation (`normalize`, default NFC): one code-point sequence per character, so "é"
   typed two ways is one token sequence; line endings become "\\n". NFKC also folds compatibility
   forms (full-width letters, ligatures); `none` keeps the text as it is.
2. empty: nothing but whitespace.
3. too_short / too_long: fewer than `min_chars` (default 5, so short CJK sayings stay) or more than
   `max_chars` characters (default: no limit; long documents are cut into samples anyway).
4. few_letters: letters (any script) are under `min_letter_share` (default 0.2) of the non-space
   characters: number tables, separator lines, emoticons.
5. bad_characters: more than `max_bad_share` (default 0.01) of the characters are replacement
   characters (U+FFFD, left by a wrong decoding), control characters other than tab and line
   breaks, private-use, unassigned or surrogate code points.
6. duplicate: the same text (after normalisation) as an earlier document.
7. near_duplicate: a near copy of an earlier kept document (MinHash LSH over word shingles;
   `andy_dist.data.near_dup`, threshold 0.8 and 5-word shingles by default; threshold 0 turns it off).

`add_cleaning_arguments` gives tools/train_tokenizer.py and tools/make_shards.py the same options, so
the tokenizer is trained on exactly the documents the shards hold.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Iterable, Iterator

from andy_dist import UserError
from andy_dist.data.corpus import Document
from andy_dist.data.near_dup import DEFAULT_SHINGLE_SIZE, DEFAULT_THRESHOLD, MAX_THRESHOLD, NearDuplicateFilter

NORMALIZATIONS = ("NFC", "NFKC", "none")
RULES = ("empty", "too_short", "too_long", "few_letters", "bad_characters", "duplicate", "near_duplicate")
_BAD_CHARS = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x9f\ufffd\ue000-\uf8ff\ud800-\udfff\U000f0000-\U0010ffff]")
_RARE_CHARS = re.compile("[^\x00-\x7f\u4e00-\u9fff]")


@dataclass(frozen=True)
class CleaningOptions:
    normalize: str = "NFC"
    min_chars: int = 5
    max_chars: int | None = None
    min_letter_share: float = 0.2
    max_bad_share: float = 0.01
    near_dup_threshold: float = DEFAULT_THRESHOLD  # 0: off
    shingle_size: int = DEFAULT_SHINGLE_SIZE

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise UserError(f"--normalize must be one of {list(NORMALIZATIONS)}, got {self.normalize!r}")
        if self.min_chars < 0 or (self.max_chars is not None and self.max_chars < max(1, self.min_chars)):
            raise UserError(f"--min-chars must be >= 0 and --max-chars >= --min-chars, got {self.min_chars} and "
                            f"{self.max_chars}")
        for name, value, top in (("--min-letter-share", self.min_letter_share, 1.0),
                                 ("--max-bad-share", self.max_bad_share, 1.0),
                                 ("--near-dup-threshold", self.near_dup_threshold, MAX_THRESHOLD)):
            if not 0.0 <= value <= top:
                raise UserError(f"{name} must be between 0 and {top}, got {value}")
        if self.shingle_size < 1:
            raise UserError(f"--shingle-size must be at least 1 word, got {self.shingle_size}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class CleaningStats:
    documents_in: int = 0
    bytes_in: int = 0  # UTF-8 bytes of every input document, dropped ones included
    normalized: int = 0  # documents whose text normalisation changed
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RULES, 0))

    @property
    def documents_out(self) -> int:
        return self.documents_in - sum(self.dropped.values())

    @property
    def empty_dropped(self) -> int:
        return self.dropped["empty"]

    @property
    def duplicates_dropped(self) -> int:
        return self.dropped["duplicate"]

    def describe(self) -> str:
        """One line: documents in and out, and what each rule dropped."""
        rules = ", ".join(f"{count} {rule.replace('_', ' ')}" for rule, count in self.dropped.items() if count)
        return (f"documents: {self.documents_in} in, {self.documents_out} out"
                f" ({rules or 'none'} dropped; {self.normalized} normalised)")


def normalize_text(text: str, form: str) -> str:
    if form == "none":
        return text
    return unicodedata.normalize(form, text.replace("\r\n", "\n").replace("\r", "\n"))


def _letter_share(text: str) -> float:
    visible = len(text) - sum(map(str.isspace, text))
    return sum(map(str.isalpha, text)) / visible if visible else 0.0


def _bad_share(text: str) -> float:
    """Share of replacement characters, controls (not tab or line breaks), private-use, surrogate and
    unassigned code points. The regex finds all but the unassigned ones quickly; those are looked up
    only among the characters outside ASCII and the common CJK block."""
    bad = len(_BAD_CHARS.findall(text))
    bad += sum(1 for c in _RARE_CHARS.findall(text) if unicodedata.category(c) == "Cn")
    return bad / max(1, len(text))


def _rule_dropping(text: str, options: CleaningOptions) -> str | None:
    """The first content rule (2-5 of the module doc) that drops `text`, or None."""
    if not text.strip():
        return "empty"
    if len(text) < options.min_chars:
        return "too_short"
    if options.max_chars is not None and len(text) > options.max_chars:
        return "too_long"
    if _letter_share(text) < options.min_letter_share:
        return "few_letters"
    if _bad_share(text) > options.max_bad_share:
        return "bad_characters"
    return None


def cleaned_documents(documents: Iterable[Document], stats: CleaningStats,
                      options: CleaningOptions | None = None) -> Iterator[Document]:
    """The documents every rule keeps, normalised, in input order; `stats` counts the rest."""
    options = options or CleaningOptions()
    seen: set[bytes] = set()
    near = NearDuplicateFilter(options.near_dup_threshold, options.shingle_size) if options.near_dup_threshold else None
    for doc in documents:
        stats.documents_in += 1
        stats.bytes_in += len(doc.text.encode("utf-8"))
        text = normalize_text(doc.text, options.normalize)
        stats.normalized += text != doc.text
        rule = _rule_dropping(text, options)
        if rule is None:
            digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
            if digest in seen:
                rule = "duplicate"
            else:
                seen.add(digest)
                if near is not None and near.is_near_duplicate(text):
                    rule = "near_duplicate"
        if rule is not None:
            stats.dropped[rule] += 1
            continue
        yield Document(doc.source, text)


def clean_documents(documents: Iterable[Document], stats: CleaningStats,
                    options: CleaningOptions | None = None) -> Iterator[str]:
    """The texts of `cleaned_documents` (what the shard writer encodes)."""
    return (doc.text for doc in cleaned_documents(documents, stats, options))


def add_cleaning_arguments(parser: argparse.ArgumentParser) -> None:
    """The cleaning options of tools/train_tokenizer.py and tools/make_shards.py (use the same on both)."""
    group = parser.add_argument_group("cleaning (use the same options for the tokenizer and the shards)")
    defaults = CleaningOptions()
    group.add_argument("--normalize", choices=NORMALIZATIONS, default=defaults.normalize,
                       help="Unicode normalisation (default NFC; NFKC also folds full-width forms)")
    group.add_argument("--min-chars", type=int, default=defaults.min_chars,
                       help=f"drop documents shorter than this (default {defaults.min_chars})")
    group.add_argument("--max-chars", type=int, default=None, help="drop documents longer than this (default: none)")
    group.add_argument("--min-letter-share", type=float, default=defaults.min_letter_share,
                       help=f"drop documents whose letters are under this share of non-space characters "
                            f"(default {defaults.min_letter_share})")
    group.add_argument("--max-bad-share", type=float, default=defaults.max_bad_share,
                       help=f"drop documents with more than this share of replacement, control, private-use or "
                            f"unassigned characters (default {defaults.max_bad_share})")
    group.add_argument("--near-dup-threshold", type=float, default=defaults.near_dup_threshold,
                       help=f"drop documents whose estimated Jaccard similarity (MinHash LSH over word shingles) "
                            f"to a kept one reaches this (default {defaults.near_dup_threshold}, at most "
                            f"{MAX_THRESHOLD}; 0: off)")
    group.add_argument("--shingle-size", type=int, default=defaults.shingle_size,
                       help=f"words per shingle for near duplicates (default {defaults.shingle_size}; a CJK "
                            f"character is one word)")


def options_from_args(args: argparse.Namespace) -> CleaningOptions:
    return CleaningOptions(normalize=args.normalize, min_chars=args.min_chars, max_chars=args.max_chars,
                           min_letter_share=args.min_letter_share, max_bad_share=args.max_bad_share,
                           near_dup_threshold=args.near_dup_threshold, shingle_size=args.shingle_size)
