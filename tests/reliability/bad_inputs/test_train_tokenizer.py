"""tools/train_tokenizer.py: missing, empty, binary or malformed input, impossible vocabulary sizes and
output paths; a failed run keeps the previous tokenizer.
"""

from __future__ import annotations

import shutil

import pytest

from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    a_file,
    check_in_a_real_process,
    check_in_this_process,
    snapshot,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


def _tok_args(w, tmp, inputs, *extra, out=None):
    out = out or tmp / "tokout"
    return ("train_tokenizer", ["--input", *inputs, "--vocab-size", 300, "--out", out, *extra], out)


@case
def tok_missing_input(w, tmp):
    tool, args, out = _tok_args(w, tmp, [tmp / "nope.txt"])
    return tool, args, ["nope.txt", "does not exist"], [out], {}


@case
def tok_glob_matches_nothing(w, tmp):
    tool, args, out = _tok_args(w, tmp, [f"{tmp}/*.jsonl"])
    return tool, args, ["matches no file"], [out], {}


@case
def tok_directory_without_text(w, tmp):
    write(tmp / "in" / "data.bin", GARBAGE)
    tool, args, out = _tok_args(w, tmp, [tmp / "in"])
    return tool, args, ["holds no .txt or .jsonl"], [out], {}


@case
def tok_wrong_suffix(w, tmp):
    tool, args, out = _tok_args(w, tmp, [write(tmp / "tokenizer.model", GARBAGE)])
    return tool, args, ["tokenizer.model", "neither .txt nor .jsonl"], [out], {}


@case
def tok_empty_txt(w, tmp):
    tool, args, out = _tok_args(w, tmp, [write(tmp / "empty.txt", b"")])
    return tool, args, ["no text"], [out], {}


@case
def tok_whitespace_jsonl(w, tmp):
    tool, args, out = _tok_args(w, tmp, [write(tmp / "blank.jsonl", '{"text": "  "}\n{"text": "\\n"}\n')])
    return tool, args, ["no text"], [out], {}


@case
def tok_garbage_txt(w, tmp):
    tool, args, out = _tok_args(w, tmp, [write(tmp / "garbage.txt", GARBAGE)])
    return tool, args, ["garbage.txt", "not UTF-8"], [out], {}


@case
def tok_latin1_txt(w, tmp):
    tool, args, out = _tok_args(w, tmp, [write(tmp / "latin1.txt", "café crème brûlée\n".encode("latin-1"))])
    return tool, args, ["latin1.txt", "not UTF-8"], [out], {}


@case
def tok_garbage_jsonl(w, tmp):
    tool, args, out = _tok_args(w, tmp, [write(tmp / "garbage.jsonl", GARBAGE)])
    return tool, args, ["garbage.jsonl:1", "not valid JSON"], [out], {}


@case
def tok_jsonl_without_text(w, tmp):
    path = write(tmp / "notext.jsonl", '{"text": "fine"}\n{"body": "no text field"}\n')
    tool, args, out = _tok_args(w, tmp, [path])
    return tool, args, ["notext.jsonl:2", "'text'"], [out], {}


@case
def tok_negative_vocab(w, tmp):
    out = tmp / "tokout"
    return "train_tokenizer", ["--input", w.corpus, "--vocab-size", -5, "--out", out], ["--vocab-size", "-5"], [out], {}


@case
def tok_vocab_too_large(w, tmp):
    path = write(tmp / "small.txt", "a small text, far too small for a big vocabulary\n" * 3)
    tool, args, out = _tok_args(w, tmp, [path])
    args[args.index("--vocab-size") + 1] = 50000
    return tool, args, ["--vocab-size", "too large"], [out], {}


@case
def tok_sample_sentences_zero(w, tmp):
    tool, args, out = _tok_args(w, tmp, [w.corpus], "--sample-sentences", 0)
    return tool, args, ["--sample-sentences"], [out], {}


@case
def tok_out_is_a_file(w, tmp):
    out = a_file(tmp)
    tool, args, _ = _tok_args(w, tmp, [w.corpus], out=out)
    return tool, args, ["--out", str(out)], [], {out: snapshot(out)}


@case
def tok_out_under_a_file(w, tmp):
    tool, args, out = _tok_args(w, tmp, [w.corpus], out=a_file(tmp) / "sub")
    return tool, args, ["--out", "a_file.txt"], [], {}


@case
def tok_failure_keeps_previous(w, tmp):
    out = tmp / "tokout"
    shutil.copytree(w.tok.parent, out)
    tool, args, _ = _tok_args(w, tmp, [write(tmp / "empty.txt", b"")], out=out)
    return tool, args, ["no text"], [], {out: snapshot(out)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["tok_garbage_txt"], "train_tokenizer", world, tmp_path)
