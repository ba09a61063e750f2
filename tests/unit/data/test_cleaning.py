"""Document cleaning (andy_dist.data.cleaning, andy_dist.data.near_dup): each rule on real text, its counts in
the manifest and make_shards' summary, and tokenizer training on the same cleaned documents."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from andy_dist import UserError
from andy_dist.data.cleaning import CleaningOptions, CleaningStats, clean_documents
from andy_dist.data.corpus import Document, read_documents
from andy_dist.data.near_dup import NearDuplicateFilter, jaccard_similarity
from andy_dist.data.tokenizer import Tokenizer
from tests.unit.data.shard_io import write_jsonl

LICENCE = """# Copyright (c) 2001-2024 The Example Software Foundation. All rights reserved.
# Licensed under the Example Licence, Version 2.0 (the "Licence"); you may not use this file except in
# compliance with the Licence. You may obtain a copy of the Licence at https://example.org/licence.
# Unless required by applicable law or agreed to in writing, software distributed under the Licence is
# distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the Licence for the specific language governing permissions and limitations under the Licence.
"""


@pytest.fixture(scope="module")
def sources(builtin_corpus) -> list[str]:
    """Real, different documents: the first 2,500 characters of standard-library modules of that size."""
    texts = [d.text for d in read_documents([str(builtin_corpus)]) if len(d.text) > 3000]
    return [t[:2500] for t in texts[:6]]


def kept(texts: list[str], **options) -> tuple[list[str], CleaningStats]:
    stats = CleaningStats()
    docs = [Document(f"doc{i}", t) for i, t in enumerate(texts)]
    return list(clean_documents(docs, stats, CleaningOptions(**options))), stats


def change_words(text: str, every: int) -> str:
    """`text` with every `every`-th word replaced (a light edit: a copy with a few words changed)."""
    count = 0

    def swap(match):
        nonlocal count
        count += 1
        return "CHANGED" if count % every == 0 else match.group(0)
    return re.sub(r"[A-Za-z]+", swap, text)


def test_documents_differing_in_a_few_words_are_dropped_as_near_duplicates(sources):
    original = sources[0]
    edited = change_words(original, 80)  # a word in 80 changed: about 5
    assert edited != original and 0.8 <= jaccard_similarity(original, edited) < 1.0
    texts, stats = kept([original, sources[1], edited, sources[2]])
    assert texts == [original, sources[1], sources[2]]  # the first of the pair stays, in input order
    assert stats.dropped["near_duplicate"] == 1 and stats.dropped["duplicate"] == 0
    # The threshold is an option: demanding near-identity keeps the edited copy.
    texts, stats = kept([original, edited], near_dup_threshold=0.95)
    assert len(texts) == 2 and stats.dropped["near_duplicate"] == 0
    texts, stats = kept([original, edited], near_dup_threshold=0)  # 0: off
    assert len(texts) == 2


def test_documents_sharing_only_boilerplate_are_kept(sources):
    texts = [LICENCE + body for body in sources]
    assert all(jaccard_similarity(texts[0], t) < 0.3 for t in texts[1:])
    out, stats = kept(texts)
    assert out == texts and stats.dropped["near_duplicate"] == 0


def test_near_duplicates_in_chinese_are_found_by_characters():
    first = "子曰：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？人不知而不愠，不亦君子乎？”\n    --《论语》学而"
    second = "子曰：“学而时习之，不亦说乎？有朋自远方来，不亦乐乎？\n       人不知而不愠，不亦君子乎？”\n-- 论语"
    other = "有子曰：“其为人也孝弟，而好犯上者，鲜矣；不好犯上，而好作乱者，未之有也。”"
    near = NearDuplicateFilter()
    assert [near.is_near_duplicate(t) for t in (first, other, second)] == [False, False, True]


def test_unicode_normalisation_makes_one_text_of_two_spellings():
    composed, decomposed = "Caf\u00e9 au lait, s'il vous pla\u00eet, merci.", "Cafe\u0301 au lait, merci beaucoup"
    texts, stats = kept([composed, "Cafe\u0301 au lait, s'il vous pla\u00eet, merci.", "one\r\ntwo\rthree four five"])
    assert texts == [composed, "one\ntwo\nthree four five"]
    assert stats.dropped["duplicate"] == 1 and stats.normalized == 2
    assert kept(["\uff26\uff55\uff4c\uff4c-width text here"], normalize="NFKC")[0] == ["Full-width text here"]
    assert kept([decomposed], normalize="none")[0] == [decomposed]


def test_length_and_character_class_rules_drop_and_count(sources):
    numbers = "\n".join(" ".join(str(i * j) for j in range(12)) for i in range(40))
    garbled = sources[1][:600] + "\ufffd" * 20
    controls = sources[2][:600] + "\x00\x07" * 10
    texts, stats = kept(["", "  \n", "tiny", numbers, garbled, controls, sources[3], "x" * 5000], max_chars=4000)
    assert texts == [sources[3]]
    assert stats.dropped == {"empty": 2, "too_short": 1, "too_long": 1, "few_letters": 1, "bad_characters": 2,
                             "duplicate": 0, "near_duplicate": 0}
    assert stats.documents_in == 8 and stats.documents_out == 1
    with pytest.raises(UserError, match="--min-letter-share"):
        CleaningOptions(min_letter_share=1.5)
    with pytest.raises(UserError, match="--near-dup-threshold"):
        CleaningOptions(near_dup_threshold=0.99)
    with pytest.raises(UserError, match="--shingle-size"):
        CleaningOptions(shingle_size=0)


def test_counts_reach_the_manifest_and_both_tools_keep_the_same_documents(sources, tmp_path, tokenizer_path, root):
    """make_shards writes each rule's count to the manifest and its summary; train_tokenizer, given the same
    input and options, reports the very same documents kept: it trains on what the shards hold."""
    noise = "\u00a7\u00b6" * 3000  # a symbol pair no kept document has: a letter-poor document
    texts = [LICENCE + s for s in sources] + [change_words(LICENCE + sources[0], 80), noise, "tiny",
                                              LICENCE + sources[2]]
    corpus = write_jsonl(tmp_path / "docs.jsonl", texts)
    shards = subprocess.run([sys.executable, str(root / "tools" / "make_shards.py"), "--input", str(corpus),
                             "--tokenizer", str(tokenizer_path), "--out", str(tmp_path / "shards"), "--workers", "1",
                             "--val-fraction", "0.2", "--max-seq-len", "128"],
                            capture_output=True, text=True, timeout=120)
    assert shards.returncode == 0, shards.stderr
    line = (f"documents: {len(texts)} in, {len(sources)} out (1 too short, 1 few letters, 1 duplicate, "
            f"1 near duplicate dropped; 0 normalised)")
    assert line in shards.stdout
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["stats"]["dropped"] == {"empty": 0, "too_short": 1, "too_long": 0, "few_letters": 1,
                                            "bad_characters": 0, "duplicate": 1, "near_duplicate": 1}
    assert manifest["cleaning"]["near_dup_threshold"] == 0.8 and manifest["cleaning"]["shingle_size"] == 5
    tok = subprocess.run([sys.executable, str(root / "tools" / "train_tokenizer.py"), "--input", str(corpus),
                          "--vocab-size", "400", "--out", str(tmp_path / "tok")],
                         capture_output=True, text=True, timeout=120)
    assert tok.returncode == 0, tok.stderr
    assert line in tok.stdout
    pieces = Tokenizer.from_file(tmp_path / "tok" / "tokenizer.model").sp
    assert not any("\u00a7\u00b6" in pieces.id_to_piece(i) for i in range(pieces.get_piece_size()))
