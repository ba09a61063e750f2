"""The tokenizer: fixed special ids, exact round trips in English and Chinese, and every bad input."""

import json
import subprocess
import sys

import pytest

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UserError
from andy_dist.data.corpus import read_documents
from andy_dist.data.tokenizer import MAX_SENTENCE_BYTES, Tokenizer, split_long_line, train_tokenizer

MIXED = "Hello,  world!\n\n\tTabs and   spaces  \n中文混合 English 123 😀\r\n end "


def test_special_ids(tokenizer):
    pieces = [tokenizer.sp.id_to_piece(i) for i in (PAD_ID, UNK_ID, BOS_ID, EOS_ID)]
    assert pieces == ["[PAD]", "[UNK]", "[BOS]", "[EOS]"]
    ids = tokenizer.encode("abc", bos=True, eos=True)
    assert ids[0] == BOS_ID and ids[-1] == EOS_ID and BOS_ID not in ids[1:-1]


def test_round_trip_is_exact_including_whitespace_and_unseen_scripts(tokenizer):
    # The built-in (Python source) tokenizer has never seen Chinese: byte fallback keeps it exact, no UNK.
    ids = tokenizer.encode(MIXED)
    assert UNK_ID not in ids
    assert tokenizer.decode(ids) == MIXED
    assert tokenizer.count_byte_fallback(ids) > 0


def test_round_trip_shakespeare(shakespeare, tmp_path):
    tok = Tokenizer.from_file(train_tokenizer(read_documents([str(shakespeare)]), 4000, tmp_path))
    text = shakespeare.read_text()
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(text.encode()) / len(ids) > 2.5  # a fitted tokenizer compresses


def test_round_trip_chinese(zh_fortunes, tmp_path):
    tok = Tokenizer.from_file(train_tokenizer(read_documents([str(zh_fortunes)]), 6000, tmp_path))
    texts = [json.loads(line)["text"] for line in zh_fortunes.open()][:300]
    for text in texts:
        assert tok.decode(tok.encode(text)) == text
    assert UNK_ID not in tok.encode("\n".join(texts))


def test_inputs_txt_jsonl_directory_and_glob(tmp_path):
    (tmp_path / "a.txt").write_text("one document\nwith two lines\n" * 50)
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps({"text": f"doc {i} 你好"}) for i in range(20)))
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("nested text " * 40)
    by_dir = [d.text for d in read_documents([str(tmp_path)])]
    by_glob = [d.text for d in read_documents([str(tmp_path / "*.jsonl"), str(tmp_path / "a.txt")])]
    assert len(by_dir) == 22 and len(by_glob) == 21
    tok = Tokenizer.from_file(train_tokenizer(read_documents([str(tmp_path)]), 300, tmp_path / "tok"))
    assert tok.vocab_size == 300 and (tmp_path / "tok" / "tokenizer.vocab").exists()


def test_long_lines_are_split_not_dropped():
    line = ("word " * 3000) + "中" * 3000
    pieces = list(split_long_line(line))
    assert "".join(pieces) == line
    assert all(len(p.encode()) <= MAX_SENTENCE_BYTES for p in pieces)


def test_long_line_is_learned(tmp_path):
    # One single 40 kB line (no newline): SentencePiece alone would skip it and find no text.
    (tmp_path / "long.txt").write_text("zebra quagga " * 3500)
    tok = Tokenizer.from_file(train_tokenizer(read_documents([str(tmp_path / "long.txt")]), 280, tmp_path / "t"))
    assert len(tok.encode("zebra quagga zebra")) < len("zebra quagga zebra")


def test_vocab_too_large_is_a_clear_error(tmp_path):
    (tmp_path / "tiny.txt").write_text("hello world, hello there")
    with pytest.raises(UserError, match="too large for this corpus"):
        train_tokenizer(read_documents([str(tmp_path / "tiny.txt")]), 2000, tmp_path / "out")


def test_empty_input_is_a_clear_error(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n")
    with pytest.raises(UserError, match="no text"):
        train_tokenizer(read_documents([str(tmp_path / "empty.txt")]), 500, tmp_path / "out")


def test_missing_path_and_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        list(read_documents([str(tmp_path / "nope.txt")]))
    with pytest.raises(UserError, match="matches no file"):
        list(read_documents([str(tmp_path / "*.txt")]))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(UserError, match="bad.jsonl:2"):
        list(read_documents([str(tmp_path / "bad.jsonl")]))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_documents([str(tmp_path / "latin1.txt")]))
    (tmp_path / "garbage.model").write_bytes(b"\x00\xff" * 100)
    with pytest.raises(UserError, match="not a SentencePiece model"):
        Tokenizer.from_file(tmp_path / "garbage.model")


def test_cli_errors_are_one_line_without_traceback(root, tmp_path):
    result = subprocess.run([sys.executable, str(root / "tools" / "train_tokenizer.py"), "--input",
                             str(tmp_path / "missing.txt"), "--vocab-size", "500", "--out", str(tmp_path / "o")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == f"error: input {tmp_path / 'missing.txt'} does not exist"
