"""tools/make_shards.py: bad inputs, tokenizers, split settings and output folders; a failed run keeps
the previous shard set and never writes into a folder that is not one.
"""

from __future__ import annotations

import pytest

from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    a_file,
    check_in_a_real_process,
    check_in_this_process,
    copy_shards,
    snapshot,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


def _shard_args(w, tmp, *extra, inputs=None, tokenizer=None, out=None):
    out = out or tmp / "shards" / "set"
    return ("make_shards", ["--input", *(inputs or [w.corpus]), "--tokenizer", tokenizer or w.tok, "--out", out,
                            "--workers", 1, "--max-seq-len", 64, *extra], out)


@case
def shards_missing_input(w, tmp):
    tool, args, out = _shard_args(w, tmp, inputs=[tmp / "nope.jsonl"])
    return tool, args, ["nope.jsonl", "does not exist"], [out], {}


@case
def shards_missing_tokenizer(w, tmp):
    tool, args, out = _shard_args(w, tmp, tokenizer=tmp / "nope.model")
    return tool, args, ["nope.model", "does not exist"], [out], {}


@case
def shards_tokenizer_dir_without_model(w, tmp):
    (tmp / "tokdir").mkdir()
    tool, args, out = _shard_args(w, tmp, tokenizer=tmp / "tokdir")
    return tool, args, ["tokdir", "does not exist"], [out], {}


@case
def shards_garbage_tokenizer(w, tmp):
    tool, args, out = _shard_args(w, tmp, tokenizer=write(tmp / "garbage.model", GARBAGE))
    return tool, args, ["garbage.model", "not a SentencePiece model"], [out], {}


@case
def shards_empty_tokenizer(w, tmp):
    tool, args, out = _shard_args(w, tmp, tokenizer=write(tmp / "empty.model", b""))
    return tool, args, ["empty.model", "not a SentencePiece model"], [out], {}


@case
def shards_empty_input(w, tmp):
    tool, args, out = _shard_args(w, tmp, inputs=[write(tmp / "empty.txt", b"")])
    return tool, args, ["no training samples"], [out], {}


@case
def shards_garbage_jsonl(w, tmp):
    tool, args, out = _shard_args(w, tmp, inputs=[write(tmp / "garbage.jsonl", GARBAGE)])
    return tool, args, ["garbage.jsonl:1", "not valid JSON"], [out], {}


@case
def shards_jsonl_without_text(w, tmp):
    tool, args, out = _shard_args(w, tmp, inputs=[write(tmp / "x.jsonl", '{"content": "hello"}\n')])
    return tool, args, ["x.jsonl:1", "'text'"], [out], {}


@case
def shards_non_utf8_txt(w, tmp):
    tool, args, out = _shard_args(w, tmp, inputs=[write(tmp / "latin1.txt", "naïve façade\n".encode("latin-1"))])
    return tool, args, ["latin1.txt", "not UTF-8"], [out], {}


@case
def shards_val_fraction_above_one(w, tmp):
    tool, args, out = _shard_args(w, tmp, "--val-fraction", 1.5)
    return tool, args, ["--val-fraction", "1.5"], [out], {}


@case
def shards_val_fraction_negative(w, tmp):
    tool, args, out = _shard_args(w, tmp, "--val-fraction", -0.1)
    return tool, args, ["--val-fraction"], [out], {}


@case
def shards_val_split_rounds_to_zero(w, tmp):
    tool, args, out = _shard_args(w, tmp, inputs=[write(tmp / "one.txt", "one document only\n")])
    return tool, args, ["validation split is empty"], [out], {}


@case
def shards_shard_size_zero(w, tmp):
    tool, args, out = _shard_args(w, tmp, "--shard-size-mb", 0)
    return tool, args, ["--shard-size-mb"], [out], {}


@case
def shards_workers_zero(w, tmp):
    tool, args, out = _shard_args(w, tmp)
    args[args.index("--workers") + 1] = 0
    return tool, args, ["--workers", "0"], [out], {}


@case
def shards_workers_negative(w, tmp):
    tool, args, out = _shard_args(w, tmp)
    args[args.index("--workers") + 1] = -2
    return tool, args, ["--workers"], [out], {}


@case
def shards_max_seq_len_one(w, tmp):
    tool, args, out = _shard_args(w, tmp)
    args[args.index("--max-seq-len") + 1] = 1
    return tool, args, ["--max-seq-len"], [out], {}


@case
def shards_out_is_a_file(w, tmp):
    out = a_file(tmp)
    tool, args, _ = _shard_args(w, tmp, out=out)
    return tool, args, ["--out", "not a directory"], [], {out: snapshot(out)}


@case
def shards_out_under_a_file(w, tmp):
    tool, args, _ = _shard_args(w, tmp, out=a_file(tmp) / "set")
    return tool, args, ["--out", "a_file.txt"], [], {}


@case
def shards_out_is_another_folder(w, tmp):
    out = tmp / "precious"
    write(out / "thesis.txt", "do not delete me")
    tool, args, _ = _shard_args(w, tmp, out=out)
    return tool, args, ["--out", "not a shard set"], [], {out: snapshot(out)}


@case
def shards_failure_keeps_previous_set(w, tmp):
    out = copy_shards(w.shards, tmp / "set")
    tool, args, _ = _shard_args(w, tmp, inputs=[write(tmp / "empty.txt", b"")], out=out)
    return tool, args, ["no training samples"], [], {out: snapshot(out)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["shards_val_fraction_above_one"], "make_shards", world, tmp_path)
