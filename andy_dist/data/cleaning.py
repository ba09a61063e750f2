"""Which documents are kept: empty and duplicate documents are dropped and counted."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable, Iterator

from andy_dist.data.corpus import Document


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


