"""The exported tokenizer, loaded by the real `transformers.AutoTokenizer`, gives exactly our ids and decodes
them back exactly: English, Chinese, code and whitespace-heavy text, from the shared corpora and the built-in
corpus, with real SentencePiece models (the session's, and one trained on the shared corpora)."""

from __future__ import annotations

import json

import pytest

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UNK_ID
from tests.conftest import SHARED_CORPORA

transformers = pytest.importorskip("transformers")

ODD_TEXTS = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a  b   c    d     e", "  leading and trailing  ",
    "tabs\tand\ttabs\t\t\tend", "\r\nwindows\r\nline ends\r\n", "x\u00a0no-break\u2009thin\u3000ideographic",
    "def f(x):\n    return {'a': [1, 2,  3]}  # comment\n\n\n\tpass\n", "12345 678.90 1e-3 0x1F",
    "中文文本，标点符号。「引号」\n第二行  两个空格", "日本語のテキストと한국어", "emoji 😀🎉 and zero\u200bwidth",
    "[BOS] [EOS] [PAD] [UNK] typed as text", "<0x41> looks like a byte piece", "ends with spaces   ",
]


def _texts_of(path, limit_docs: int = 400) -> list[str]:
    from andy_dist.data.corpus import read_documents

    docs = [doc.text for doc in read_documents([str(path)])][:limit_docs]
    paragraphs = [p for doc in docs[:40] for p in doc.split("\n\n")[:20]]
    return docs + paragraphs


@pytest.fixture(scope="module")
def corpus_texts(builtin_corpus) -> dict[str, list[str]]:
    texts = {"builtin": _texts_of(builtin_corpus)}
    for name in ("tinyshakespeare.txt", "zh_fortunes.jsonl"):
        if (SHARED_CORPORA / name).exists():
            texts[name] = _texts_of(SHARED_CORPORA / name)
    return texts


@pytest.fixture(scope="module")
def mixed_tokenizer(builtin_corpus, tmp_path_factory):
    """A 6,000-piece tokenizer that has Chinese pieces: trained on the shared corpora beside the built-in one."""
    from andy_dist.data.corpus import read_documents
    from andy_dist.data.tokenizer import Tokenizer, train_tokenizer

    inputs = [str(builtin_corpus)] + [str(SHARED_CORPORA / n) for n in ("tinyshakespeare.txt", "zh_fortunes.jsonl")
                                       if (SHARED_CORPORA / n).exists()]
    return Tokenizer.from_file(train_tokenizer(read_documents(inputs), 6000, tmp_path_factory.mktemp("mixed")))


def _hf_tokenizer(tokenizer, directory):
    from andy_dist.infer.hf_tokenizer import save_hf_tokenizer

    save_hf_tokenizer(tokenizer, directory, 512)
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("which", ["session", "mixed"])
def test_ids_and_round_trips_equal_ours_on_every_corpus(which, tokenizer, mixed_tokenizer, corpus_texts, tmp_path):
    ours = tokenizer if which == "session" else mixed_tokenizer
    hf = _hf_tokenizer(ours, tmp_path / "tok")
    checked = 0
    for corpus, texts in {**corpus_texts, "odd": ODD_TEXTS}.items():
        for text in texts:
            ids = ours.encode(text)
            assert hf(text, add_special_tokens=False)["input_ids"] == ids, (corpus, text[:200])
            assert hf.decode(ids) == ours.decode(ids) == text, (corpus, text[:200])
            checked += 1
    assert checked > 500
    if which == "mixed" and "zh_fortunes.jsonl" in corpus_texts:  # real Chinese pieces, not only byte fallback
        ids = ours.encode(corpus_texts["zh_fortunes.jsonl"][0])
        assert ours.count_byte_fallback(ids) < len(ids) / 4


def test_special_tokens_bos_template_and_left_padding(tokenizer, tmp_path):
    hf = _hf_tokenizer(tokenizer, tmp_path / "tok")
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (PAD_ID, UNK_ID, BOS_ID, EOS_ID)
    assert hf.convert_ids_to_tokens([0, 1, 2, 3]) == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    assert set(hf.all_special_ids) == {PAD_ID, UNK_ID, BOS_ID, EOS_ID}
    text = "import os\nprint(os.sep)"
    assert hf(text)["input_ids"] == tokenizer.encode(text, bos=True)
    assert hf.decode(hf(text)["input_ids"], skip_special_tokens=True) == text
    batch = hf(["a longer prompt here", "x"], padding=True)
    short = tokenizer.encode("x", bos=True)
    assert batch["input_ids"][1][-len(short):] == short and set(batch["input_ids"][1][:-len(short)]) == {PAD_ID}
    assert batch["attention_mask"][1] == [0] * (len(batch["input_ids"][1]) - len(short)) + [1] * len(short)
    config = json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (tmp_path / "tok" / "tokenizer.model").read_bytes() == tokenizer.model_bytes


def test_a_tokenizer_trained_otherwise_is_refused(tmp_path):
    """A SentencePiece model with a dummy prefix (the library's default) cannot be reproduced exactly: refused."""
    import sentencepiece as spm

    from andy_dist import UserError
    from andy_dist.data.tokenizer import Tokenizer
    from andy_dist.infer.hf_tokenizer import fast_tokenizer

    corpus = tmp_path / "c.txt"
    corpus.write_text("".join(f"the quick brown fox {i} jumps over the lazy dog\n" for i in range(400)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "m"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                                   pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[BOS]", eos_piece="[EOS]",
                                   minloglevel=2)
    with pytest.raises(UserError, match="dummy prefix"):
        fast_tokenizer(Tokenizer.from_file(tmp_path / "m.model"))
