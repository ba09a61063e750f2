"""Near-duplicate documents, found with MinHash LSH (`datasketch`).

A document is reduced to its set of shingles: runs of `shingle_size` consecutive words, where a word
is a run of letters and digits, and every CJK character counts as a word of its own (Chinese and
Japanese have no spaces, so their shingles are runs of characters). Two documents are near
duplicates when the Jaccard similarity of their shingle sets is at least `threshold`; MinHash
estimates that similarity from `num_perm` hash values per document, and LSH banding finds the
candidates among the documents kept so far without comparing every pair. A candidate is confirmed
with the estimated similarity itself, so a banding false positive never drops a document.

Defaults (documented in tools/make_shards.py --help): shingles of 5 words and a threshold of 0.8.
Documents differing in a few words share most 5-word shingles (dropped); documents that share only a
licence header or other boilerplate share few of theirs (kept). The first document of a group is
kept, in input order, so a rerun drops the same documents.

Memory: one `LeanMinHash` (num_perm 32-bit values, about 0.5 KB at 128) per kept document.
"""

from __future__ import annotations

import re
import zlib

from datasketch import LeanMinHash, MinHash, MinHashLSH

DEFAULT_THRESHOLD = 0.8
DEFAULT_SHINGLE_SIZE = 5
NUM_PERM = 128
MAX_THRESHOLD = 0.95
"""Above this, LSH with 128 permutations has too few bands to find the pairs (exact copies are caught anyway)."""

# One CJK character (ideographs, kana, hangul) per word; otherwise runs of letters, digits and underscore.
_CJK = "\u2e80-\u2fff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def _hash32(data: bytes) -> int:
    """A stable, fast 32-bit hash of a shingle (datasketch's default, sha1, costs most of the time here;
    MinHash's random affine permutations on top of it supply the independence)."""
    return zlib.crc32(data)


def shingles(text: str, size: int) -> set[bytes]:
    """The document's shingles: runs of `size` consecutive words, lower-cased (a shorter text: one shingle)."""
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words).encode("utf-8")} if words else set()
    return {" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


class NearDuplicateFilter:
    """Feed documents in order; `is_near_duplicate(text)` says whether a kept one is too similar.

    threshold: Jaccard similarity of shingle sets at or above which a document is dropped (0 < t <= 0.95).
    shingle_size: words per shingle (>= 1). Smaller shingles find looser matches.
    """

    def __init__(self, threshold: float = DEFAULT_THRESHOLD, shingle_size: int = DEFAULT_SHINGLE_SIZE,
                 num_perm: int = NUM_PERM):
        if not 0.0 < threshold <= MAX_THRESHOLD:
            raise ValueError(f"near-duplicate threshold must be in (0, {MAX_THRESHOLD}], got {threshold}")
        if shingle_size < 1:
            raise ValueError(f"shingle size must be at least 1, got {shingle_size}")
        self.threshold, self.shingle_size, self.num_perm = threshold, shingle_size, num_perm
        self._lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self._kept: dict[int, LeanMinHash] = {}
        # Drawing the permutations costs more than hashing a document: draw them once (seeded, so reruns agree).
        prototype = MinHash(num_perm=num_perm, hashfunc=_hash32)
        self._permutations, self._scheme = prototype.permutations, prototype.scheme

    def minhash(self, text: str) -> LeanMinHash | None:
        found = shingles(text, self.shingle_size)
        if not found:
            return None
        sketch = MinHash(num_perm=self.num_perm, hashfunc=_hash32, permutations=self._permutations,
                         scheme=self._scheme)
        sketch.update_batch(found)
        return LeanMinHash(sketch)

    def is_near_duplicate(self, text: str) -> bool:
        """True if `text` is a near duplicate of a document kept earlier; otherwise it is kept (remembered)."""
        sketch = self.minhash(text)
        if sketch is None:
            return False  # no words at all: nothing to compare (the other rules judge such text)
        for key in self._lsh.query(sketch):
            if sketch.jaccard(self._kept[key]) >= self.threshold:
                return True
        key = len(self._kept)
        self._kept[key] = sketch
        self._lsh.insert(key, sketch, check_duplication=False)
        return False


def jaccard_similarity(a: str, b: str, shingle_size: int = DEFAULT_SHINGLE_SIZE) -> float:
    """The exact Jaccard similarity of two texts' shingle sets (for tests and tuning the threshold)."""
    sa, sb = shingles(a, shingle_size), shingles(b, shingle_size)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)

