"""Bad input across the tools: every user mistake ends in one clear line, exit status 2, no traceback,
and no output file or folder left half-written (a previous output stays untouched).

The tools run in this process through `runpy` (as `python tools/X.py ...` would run them, including
`run_tool`'s handling of `UserError`), so one torch import serves ~100 cases: an exception that
escapes the tool fails the test as "a traceback the user would see". A few cases per tool also run
as real subprocesses, to check the exit status and stderr end to end. launch/train.py runs in this
process only for mistakes caught before the process group starts (`init_distributed` is replaced by
a tripwire); the one mistake caught after it (resuming a checkpoint of another model) is one real
training launch.

Real artefacts: the session's 2,000-piece tokenizer and shards (tests/conftest.py), a second 600-piece
tokenizer with its own shards, one 2-step training run (checkpoint), its int8 export, and a random
model file made with the second tokenizer.
"""

from __future__ import annotations

import io
import json
import random
import re
import runpy
import shutil
import subprocess
import sys
import traceback
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.launching import ROOT, cpu_env, train

pytestmark = [pytest.mark.slow]

TOOLS = {
    "train_tokenizer": "tools/train_tokenizer.py",
    "make_shards": "tools/make_shards.py",
    "train": "launch/train.py",
    "export": "tools/export.py",
    "generate": "tools/generate.py",
    "evaluate": "tools/evaluate.py",
    "report": "tools/report.py",
    "import_hf": "tools/import_hf.py",
}
GARBAGE = b"\xff\xfe\x00\x81PK\x03\x04" + random.Random(7).randbytes(4096)  # not UTF-8, not JSON, not a model
ERROR_LINE = re.compile(r"^(\S+: )?error: ")  # run_tool's "error: ..." or argparse's "prog: error: ..."


# ---------------------------------------------------------------------------------------------
# Running a tool


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        lines = [line for line in re.split(r"[\r\n]", self.err) if line.strip()]
        return lines[-1] if lines else ""


class _Tripwire(Exception):
    pass


def _refuse_distributed(*_args, **_kwargs):
    raise _Tripwire("launch/train.py reached init_distributed: the mistake was not caught before DeepSpeed")


def run_here(tool: str, *args) -> Result:
    """Run tools/X.py in this process, as `python tools/X.py ARGS` would (through `run_tool`)."""
    import andy_dist.train.engine

    script = ROOT / TOOLS[tool]
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_init = sys.argv, andy_dist.train.engine.init_distributed
    sys.argv = [str(script), *map(str, args)]
    andy_dist.train.engine.init_distributed = _refuse_distributed
    code = None
    try:
        with redirect_stdout(out), redirect_stderr(err):
            runpy.run_path(str(script), run_name="__main__")
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except BaseException as exc:  # noqa: BLE001 - anything else is a traceback the user would see
        pytest.fail(f"{tool} {' '.join(map(str, args))}\nescaped as {type(exc).__name__} (the user would see a "
                    f"traceback):\n{''.join(traceback.format_exception(exc))[-3000:]}\nstderr:\n{err.getvalue()[-2000:]}")
    finally:
        sys.argv = old_argv
        andy_dist.train.engine.init_distributed = old_init
    return Result(0 if code is None else code, out.getvalue(), err.getvalue())


def run_process(tool: str, *args, timeout: int = 120) -> Result:
    proc = subprocess.run([sys.executable, str(ROOT / TOOLS[tool]), *map(str, args)], cwd=ROOT, env=cpu_env(),
                          capture_output=True, text=True, timeout=timeout)
    return Result(proc.returncode, proc.stdout, proc.stderr)


def leftovers(directory: Path) -> list[str]:
    """Names in `directory` that look like an unfinished output (atomic_path/.partial/.tmp files)."""
    if not directory.is_dir():
        return []
    return sorted(p.name for p in directory.iterdir() if re.search(r"\.partial|\.tmp|\.old-", p.name))


def assert_user_error(result: Result, *needles: str, absent=(), untouched: dict | None = None) -> None:
    """Exit 2, last stderr line an error naming each needle, no traceback, no output left behind."""
    context = f"exit {result.code}\nstdout:\n{result.out[-1500:]}\nstderr:\n{result.err[-3000:]}"
    assert "Traceback" not in result.err, context
    assert result.code == 2, context
    last = result.last_line
    assert ERROR_LINE.match(last), context
    for needle in needles:
        assert needle.lower() in last.lower(), f"{needle!r} not in the error line {last!r}"
    for path in absent:
        path = Path(path)
        assert not path.exists(), f"{path} was left behind\n{context}"
        assert not leftovers(path.parent), f"unfinished output {leftovers(path.parent)} in {path.parent}"
    for path, content in (untouched or {}).items():
        assert _snapshot(path) == content, f"{path} was changed by a failed run\n{context}"


def _snapshot(path: Path):
    path = Path(path)
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Real artefacts, built once for the module


@dataclass
class World:
    corpus: Path
    tok: Path  # 2,000 pieces: the one the shards, the run and model.andy use
    shards: Path
    tok2: Path  # 600 pieces: another tokenizer
    shards2: Path
    run: Path  # a finished 2-step training run (one process)
    model: Path  # its int8 export
    model2: Path  # a random model made with tok2
    base: Path

    @property
    def ckpt(self) -> Path:
        return self.run / "checkpoints"

    def train_args(self, out: Path, *extra) -> list:
        return ["--ds_config", ROOT / "ds_configs/tiny.json", "--data", self.shards, "--tokenizer", self.tok,
                "--out", out, "model.vocab_size=2000", "model.d_model=32", "precision=fp32", "sample_prompts=[]",
                "wandb=disabled", "warmup_steps=1", *extra]


@pytest.fixture(scope="module")
def world(builtin_corpus, tokenizer_path, train_shards, tmp_path_factory) -> World:
    import torch

    from andy_dist.config import ModelConfig
    from andy_dist.data.corpus import read_documents
    from andy_dist.model import AndyLM
    from andy_dist.infer.model_file import save_model_file
    from andy_dist.data.shard_writer import write_shards
    from andy_dist.data.tokenizer import Tokenizer, train_tokenizer

    base = tmp_path_factory.mktemp("bad_inputs")
    tok2 = train_tokenizer(read_documents([str(builtin_corpus)]), 600, base / "tok2")
    shards2 = base / "shards2"
    write_shards([str(builtin_corpus)], tok2, shards2, val_fraction=0.05, workers=1, max_seq_len=64, progress=False)
    run = base / "run"
    w = World(builtin_corpus, tokenizer_path, train_shards, tok2, shards2, run, base / "model.andy",
              base / "model2.andy", base)
    train("python", w.train_args(run, "--max-steps", 2), nproc=1)
    result = run_here("export", "--int8", w.ckpt, "-o", w.model)
    assert result.code == 0 and w.model.is_file(), result.err
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=600, d_model=32, n_heads=2, n_layers=1, max_seq_len=64, dropout=0.0)
    save_model_file(w.model2, AndyLM(cfg).state_dict(), cfg, Tokenizer.from_file(tok2), dtype="fp32")
    return w


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def a_file(tmp: Path) -> Path:
    return write(tmp / "a_file.txt", "some text\n")


# ---------------------------------------------------------------------------------------------
# The cases: each builds its bad input under `tmp` and returns
# (tool, args, words the error line must hold, paths that must not exist, paths that must not change).

CASES: dict[str, callable] = {}


def case(fn):
    CASES[fn.__name__] = fn
    return fn


def _tok_args(w, tmp, inputs, *extra, out=None):
    out = out or tmp / "tokout"
    return ("train_tokenizer", ["--input", *inputs, "--vocab-size", 300, "--out", out, *extra], out)


# --- tools/train_tokenizer.py ------------------------------------------------------------------
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
    return tool, args, ["--out", str(out)], [], {out: _snapshot(out)}


@case
def tok_out_under_a_file(w, tmp):
    tool, args, out = _tok_args(w, tmp, [w.corpus], out=a_file(tmp) / "sub")
    return tool, args, ["--out", "a_file.txt"], [], {}


@case
def tok_failure_keeps_previous(w, tmp):
    out = tmp / "tokout"
    shutil.copytree(w.tok.parent, out)
    tool, args, _ = _tok_args(w, tmp, [write(tmp / "empty.txt", b"")], out=out)
    return tool, args, ["no text"], [], {out: _snapshot(out)}


# --- tools/make_shards.py ----------------------------------------------------------------------
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
    return tool, args, ["--out", "not a directory"], [], {out: _snapshot(out)}


@case
def shards_out_under_a_file(w, tmp):
    tool, args, _ = _shard_args(w, tmp, out=a_file(tmp) / "set")
    return tool, args, ["--out", "a_file.txt"], [], {}


@case
def shards_out_is_another_folder(w, tmp):
    out = tmp / "precious"
    write(out / "thesis.txt", "do not delete me")
    tool, args, _ = _shard_args(w, tmp, out=out)
    return tool, args, ["--out", "not a shard set"], [], {out: _snapshot(out)}


@case
def shards_failure_keeps_previous_set(w, tmp):
    out = copy_shards(w.shards, tmp / "set")
    tool, args, _ = _shard_args(w, tmp, inputs=[write(tmp / "empty.txt", b"")], out=out)
    return tool, args, ["no training samples"], [], {out: _snapshot(out)}


# --- launch/train.py (caught before DeepSpeed starts) ------------------------------------------
def _train(w, tmp, *extra, data=None, tokenizer=None):
    out = tmp / "run"
    args = w.train_args(out, *extra)
    if data is not None:
        args[args.index("--data") + 1] = data
    if tokenizer is not None:
        args[args.index("--tokenizer") + 1] = tokenizer
    return "train", args, out


def _train_case(w, tmp, needles, *extra, data=None, tokenizer=None):
    tool, args, out = _train(w, tmp, *extra, data=data, tokenizer=tokenizer)
    return tool, args, needles, [out], {}


@case
def train_missing_data(w, tmp):
    return _train_case(w, tmp, ["nope", "does not exist"], data=tmp / "nope")


@case
def train_data_is_a_file(w, tmp):
    return _train_case(w, tmp, ["a_file.txt", "manifest.json"], data=a_file(tmp))


@case
def train_data_without_manifest(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    (data / "manifest.json").unlink()
    return _train_case(w, tmp, ["manifest.json", "missing"], data=data)


@case
def train_manifest_garbage(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    write(data / "manifest.json", GARBAGE)
    return _train_case(w, tmp, ["manifest.json", "not valid JSON"], data=data)


@case
def train_manifest_wrong_json(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    write(data / "manifest.json", '{"format": "something else"}')
    return _train_case(w, tmp, ["manifest.json", "not an andy-shards manifest"], data=data)


@case
def train_manifest_missing_keys(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    manifest = json.loads((data / "manifest.json").read_text())
    del manifest["splits"]["train"]["shards"][0]["sha256"]
    write(data / "manifest.json", json.dumps(manifest))
    return _train_case(w, tmp, ["manifest.json", "malformed", "sha256"], data=data)


@case
def train_truncated_shard(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    shard = data / "train-000000.tar"
    write(shard, shard.read_bytes()[:10000])
    return _train_case(w, tmp, ["train-000000.tar", "truncated"], data=data)


@case
def train_shard_sha256_mismatch(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    shard = data / "train-000000.tar"
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    write(shard, bytes(raw))
    return _train_case(w, tmp, ["train-000000.tar", "sha256"], data=data)


@case
def train_shard_replaced_by_garbage(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    shard = data / "val-000000.tar"
    write(shard, (GARBAGE * 100)[: shard.stat().st_size])
    return _train_case(w, tmp, ["val-000000.tar", "corrupt"], data=data)


def poison_shard(shards: Path, split: str, marker: Path) -> Path:
    """Append a pickle member (`99999999.pyd`) to a shard and fix the manifest's size and sha256 to match."""
    import hashlib
    import pickle
    import tarfile

    shard = shards / f"{split}-000000.tar"
    payload = pickle.dumps(_Payload(str(marker)))
    with tarfile.open(shard, "a") as tar:
        info = tarfile.TarInfo("99999999.pyd")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["splits"][split]["shards"][0]
    entry["bytes"], entry["sha256"] = shard.stat().st_size, hashlib.sha256(shard.read_bytes()).hexdigest()
    write(shards / "manifest.json", json.dumps(manifest))
    return shard


@case
def train_shard_with_pickle_member(w, tmp):
    """A shard carrying a pickled callable (a .pyd member) is refused and the callable never runs."""
    marker = tmp / "pwned"
    data = copy_shards(w.shards, tmp / "set")
    poison_shard(data, "val", marker)
    tool, args, out = _train(w, tmp, data=data)
    return tool, args, ["val-000000.tar", "99999999"], [out, marker], {}


@case
def train_missing_lengths_file(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    (data / "train-lengths.npy").unlink()
    return _train_case(w, tmp, ["train-lengths.npy"], data=data)


@case
def train_tokenizer_mismatch(w, tmp):
    return _train_case(w, tmp, ["different tokenizer"], tokenizer=w.tok2)


@case
def train_missing_tokenizer(w, tmp):
    return _train_case(w, tmp, ["nope.model"], tokenizer=tmp / "nope.model")


@case
def train_garbage_tokenizer(w, tmp):
    return _train_case(w, tmp, ["garbage.model", "not a SentencePiece model"],
                       tokenizer=write(tmp / "garbage.model", GARBAGE))


@case
def train_vocab_smaller_than_shards(w, tmp):
    return _train_case(w, tmp, ["vocab_size", "2000"], "model.vocab_size=1000")


@case
def train_missing_ds_config(w, tmp):
    tool, args, out = _train(w, tmp)
    args[args.index("--ds_config") + 1] = tmp / "nope.json"
    return tool, args, ["--ds_config", "nope.json"], [out], {}


@case
def train_garbage_ds_config(w, tmp):
    tool, args, out = _train(w, tmp)
    args[args.index("--ds_config") + 1] = write(tmp / "tiny.json", GARBAGE)
    return tool, args, ["--ds_config", "tiny.json"], [out], {}


@case
def train_ds_config_is_a_directory(w, tmp):
    tool, args, out = _train(w, tmp)
    args[args.index("--ds_config") + 1] = tmp
    return tool, args, ["--ds_config"], [out], {}


@case
def train_garbage_yaml(w, tmp):
    return _train_case(w, tmp, ["garbage.yaml"], "--config", write(tmp / "garbage.yaml", GARBAGE))


@case
def train_missing_yaml(w, tmp):
    return _train_case(w, tmp, ["nope.yaml", "does not exist"], "--config", tmp / "nope.yaml")


@case
def train_unknown_key(w, tmp):
    return _train_case(w, tmp, ["unknown config keys", "learning_rate"], "learning_rate=1")


@case
def train_max_steps_zero(w, tmp):
    return _train_case(w, tmp, ["max_steps"], "--max-steps", 0)


@case
def train_max_steps_negative(w, tmp):
    return _train_case(w, tmp, ["max_steps"], "--max-steps", -3)


@case
def train_micro_batch_zero(w, tmp):
    return _train_case(w, tmp, ["micro_batch_size"], "micro_batch_size=0")


@case
def train_global_batch_out_of_range(w, tmp):
    return _train_case(w, tmp, ["global_batch_size=1000"], "global_batch_size=1000")


@case
def train_lr_negative(w, tmp):
    return _train_case(w, tmp, ["lr"], "lr=-1")


@case
def train_dropout_out_of_range(w, tmp):
    return _train_case(w, tmp, ["model.dropout"], "model.dropout=1.5")


@case
def train_out_is_a_file(w, tmp):
    tool, args, _ = _train(w, tmp)
    out = a_file(tmp)
    args[args.index("--out") + 1] = out
    return tool, args, ["--out", "a_file.txt"], [], {out: _snapshot(out)}


@case
def train_out_under_a_file(w, tmp):
    tool, args, _ = _train(w, tmp)
    args[args.index("--out") + 1] = a_file(tmp) / "run"
    return tool, args, ["--out", "a_file.txt"], [], {}


# --- tools/export.py ---------------------------------------------------------------------------
def _export(w, tmp, *args, ckpt=None):
    out = tmp / "model.andy"
    return "export", ["--int8", ckpt or w.ckpt, "-o", out, *args], out


def _copy_ckpt(w, tmp) -> Path:
    return Path(shutil.copytree(w.ckpt, tmp / "checkpoints"))


@case
def export_missing_checkpoint_dir(w, tmp):
    tool, args, out = _export(w, tmp, ckpt=tmp / "nope")
    return tool, args, ["nope", "does not exist"], [out], {}


@case
def export_checkpoint_is_a_file(w, tmp):
    tool, args, out = _export(w, tmp, ckpt=a_file(tmp))
    return tool, args, ["a_file.txt"], [out], {}


@case
def export_no_latest(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    (ckpt / "latest").unlink()
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["no 'latest' file", "step-000002"], [out], {}


@case
def export_latest_names_missing_tag(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    write(ckpt / "latest", "step-000999")
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["step-000999", "available tags"], [out], {}


@case
def export_latest_is_garbage(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    write(ckpt / "latest", GARBAGE)
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["latest"], [out], {}


@case
def export_unknown_tag(w, tmp):
    tool, args, out = _export(w, tmp, "--tag", "step-000123")
    return tool, args, ["step-000123", "available tags"], [out], {}


@case
def export_truncated_model_states(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    path = ckpt / "step-000002" / "mp_rank_00_model_states.pt"
    write(path, path.read_bytes()[: path.stat().st_size // 2])
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["mp_rank_00_model_states.pt"], [out], {}


@case
def export_truncated_optim_states(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    path = ckpt / "step-000002" / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    write(path, path.read_bytes()[:1000])
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["zero_pp_rank_0_mp_rank_00_optim_states.pt"], [out], {}


@case
def export_missing_rank_file(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    (ckpt / "step-000002" / "mp_rank_00_model_states.pt").unlink()
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["model_states.pt"], [out], {}


@case
def export_rank_file_is_garbage(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    write(ckpt / "step-000002" / "mp_rank_00_model_states.pt", GARBAGE)
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["mp_rank_00_model_states.pt"], [out], {}


@case
def export_meta_garbage(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    write(ckpt / "step-000002" / "andy_meta.json", GARBAGE)
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["andy_meta.json"], [out], {}


@case
def export_meta_missing(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    (ckpt / "step-000002" / "andy_meta.json").unlink()
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["andy_meta.json"], [out], {}


@case
def export_meta_wrong_model_config(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    path = ckpt / "step-000002" / "andy_meta.json"
    meta = json.loads(path.read_text())
    meta["model_config"]["d_model"] = 64
    write(path, json.dumps(meta))
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["does not match its model_config"], [out], {}


@case
def export_tokenizer_mismatch(w, tmp):
    tool, args, out = _export(w, tmp, "--tokenizer", w.tok2)
    return tool, args, ["tokenizer", "--tokenizer"], [out], {}


@case
def export_garbage_tokenizer(w, tmp):
    tool, args, out = _export(w, tmp, "--tokenizer", write(tmp / "garbage.model", GARBAGE))
    return tool, args, ["garbage.model"], [out], {}


@case
def export_pickle_payload_refused(w, tmp):
    """A checkpoint file carrying a pickled callable is refused, and the callable never runs."""
    import torch

    ckpt = _copy_ckpt(w, tmp)
    marker = tmp / "pwned"
    torch.save({"module": _Payload(str(marker))}, ckpt / "step-000002" / "mp_rank_00_model_states.pt")
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["mp_rank_00_model_states.pt", "safely"], [out, marker], {}


class _Payload:
    """Unpickling it creates the file `path`: proof that a loader ran code from a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


@case
def export_output_is_a_directory(w, tmp):
    (tmp / "outdir").mkdir()
    return "export", ["--int8", w.ckpt, "-o", tmp / "outdir"], ["outdir", "directory"], [], {tmp / "outdir": {}}


@case
def export_output_under_a_file(w, tmp):
    return "export", ["--int8", w.ckpt, "-o", a_file(tmp) / "model.andy"], ["a_file.txt"], [], {}


@case
def export_failure_keeps_previous_output(w, tmp):
    out = write(tmp / "model.andy", b"the previous export")
    return ("export", ["--int8", w.ckpt, "--tag", "nope", "-o", out], ["nope"], [], {out: b"the previous export"})


# --- tools/export.py --hf, tools/import_hf.py, init_from= ----------------------------------------
def _hf_dir(w) -> Path:
    """The world's checkpoint as a Hugging Face directory, exported once."""
    out = w.base / "hf"
    if not out.is_dir():
        result = run_here("export", "--hf", out, w.ckpt)
        assert result.code == 0, result.err
    return out


def _hf_copy(w, tmp, drop=()) -> Path:
    hf = Path(shutil.copytree(_hf_dir(w), tmp / "hf_copy"))
    for name in drop:
        (hf / name).unlink()
    return hf


def _other_family(tmp) -> Path:
    write(tmp / "llama" / "config.json", json.dumps({"model_type": "llama", "hidden_size": 64,
                                                     "architectures": ["LlamaForCausalLM"]}))
    write(tmp / "llama" / "model.safetensors", GARBAGE)
    return tmp / "llama"


@case
def export_hf_into_a_non_empty_directory(w, tmp):
    out = write(tmp / "hf" / "notes.txt", "mine")
    return ("export", ["--hf", out.parent, w.ckpt], ["hf", "not empty", "--force"], [],
            {out.parent: {"notes.txt": b"mine"}})


@case
def export_hf_from_another_model_family(w, tmp):
    return ("export", ["--hf", tmp / "out", _other_family(tmp)], ["llama", "not an andy_dist checkpoint"],
            [tmp / "out"], {})


@case
def export_hf_checkpoint_of_another_family(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    path = ckpt / "step-000002" / "andy_meta.json"
    meta = json.loads(path.read_text())
    meta["model_config"] = {"hidden_size": 64, "num_attention_heads": 2, "rope_theta": 10000.0}
    write(path, json.dumps(meta))
    return "export", ["--hf", tmp / "out", ckpt], ["unknown model config keys", "rope_theta"], [tmp / "out"], {}


@case
def export_hf_missing_tokenizer(w, tmp):
    ckpt = _copy_ckpt(w, tmp)
    (ckpt / "tokenizer.model").unlink()
    return "export", ["--hf", tmp / "out", ckpt], ["no tokenizer", "--tokenizer"], [tmp / "out"], {}


@case
def export_hf_int8_model_file(w, tmp):
    return "export", ["--hf", tmp / "out", "--from", w.model], ["int8", "--dequantize"], [tmp / "out"], {}


@case
def export_hf_int8_dtype(w, tmp):
    return "export", ["--hf", tmp / "out", w.ckpt, "--dtype", "int8"], ["float weights"], [tmp / "out"], {}


@case
def export_hf_from_garbage(w, tmp):
    return ("export", ["--hf", tmp / "out", "--from", write(tmp / "x.andy", GARBAGE)], ["not an andy model file"],
            [tmp / "out"], {})


@case
def export_from_without_hf(w, tmp):
    return "export", ["--from", w.model, "-o", tmp / "m.andy"], ["--hf"], [tmp / "m.andy"], {}


@case
def export_average_last_too_few(w, tmp):
    tool, args, out = _export(w, tmp, "--average-last", 3)
    return tool, args, ["--average-last 3", "only 1 step checkpoint"], [out], {}


@case
def export_average_unknown_tag(w, tmp):
    tool, args, out = _export(w, tmp, "--average", "step-000002", "step-000777")
    return tool, args, ["step-000777", "available tags"], [out], {}


def _import(hf, tmp, *extra):
    out = tmp / "imported.andy"
    return "import_hf", [hf, "--out", out, *extra], out


@case
def import_hf_missing_directory(w, tmp):
    tool, args, out = _import(tmp / "nope", tmp)
    return tool, args, ["nope", "not a directory"], [out], {}


@case
def import_hf_other_family(w, tmp):
    tool, args, out = _import(_other_family(tmp), tmp)
    return tool, args, ["'llama'", "not GPT-2"], [out], {}


@case
def import_hf_pickle_only(w, tmp):
    hf = _hf_copy(w, tmp, drop=["model.safetensors"])
    write(hf / "pytorch_model.bin", GARBAGE)
    tool, args, out = _import(hf, tmp)
    return tool, args, ["pytorch_model.bin", "pickle"], [out], {}


@case
def import_hf_truncated_weights(w, tmp):
    hf = _hf_copy(w, tmp)
    data = (hf / "model.safetensors").read_bytes()
    write(hf / "model.safetensors", data[: len(data) // 2])
    tool, args, out = _import(hf, tmp)
    return tool, args, ["model.safetensors", "not a readable safetensors"], [out], {}


@case
def import_hf_missing_tokenizer(w, tmp):
    tool, args, out = _import(_hf_copy(w, tmp, drop=["tokenizer.model"]), tmp)
    return tool, args, ["no tokenizer.model", "--tokenizer"], [out], {}


@case
def import_hf_tokenizer_of_another_size(w, tmp):
    tool, args, out = _import(_hf_dir(w), tmp, "--tokenizer", w.tok2)
    return tool, args, ["600 pieces", "2000"], [out], {}


@case
def import_hf_unsupported_gpt2_variant(w, tmp):
    hf = _hf_copy(w, tmp)
    config = json.loads((hf / "config.json").read_text())
    write(hf / "config.json", json.dumps(dict(config, scale_attn_by_inverse_layer_idx=True)))
    tool, args, out = _import(hf, tmp)
    return tool, args, ["scale_attn_by_inverse_layer_idx"], [out], {}


@case
def train_old_shards_without_tokenizer(w, tmp):
    shards = copy_shards(w.shards, tmp / "old")
    (shards / "tokenizer.model").unlink()
    tool, args, out = _train(w, tmp, data=shards)
    args.remove("--tokenizer")
    args.remove(w.tok)
    return tool, args, ["no tokenizer at", "--tokenizer"], [out], {}


@case
def train_init_from_missing(w, tmp):
    return _train_case(w, tmp, ["init_from", "does not exist"], f"init_from={tmp / 'nope.andy'}")


@case
def train_init_from_int8(w, tmp):
    return _train_case(w, tmp, ["int8", "andy-export --fp32"], f"init_from={w.model}")


@case
def train_init_from_shape_clash(w, tmp):
    return _train_case(w, tmp, ["fixes the model's shape", "model.n_layers=5"], f"init_from={_hf_dir(w)}",
                       "model.n_layers=5")


@case
def train_init_from_other_family(w, tmp):
    return _train_case(w, tmp, ["'llama'", "not GPT-2"], f"init_from={_other_family(tmp)}")


# --- tools/generate.py -------------------------------------------------------------------------
def _gen(model, *extra):
    return "generate", [model, "--prompt", "import os", "--max-new-tokens", 4, "--seed", 1, *extra]


@case
def gen_missing_model(w, tmp):
    tool, args = _gen(tmp / "nope.andy")
    return tool, args, ["nope.andy", "does not exist"], [], {}


@case
def gen_model_is_a_directory(w, tmp):
    tool, args = _gen(tmp)
    return tool, args, [tmp.name, "directory"], [], {}


@case
def gen_empty_model(w, tmp):
    tool, args = _gen(write(tmp / "empty.andy", b""))
    return tool, args, ["empty.andy", "not an andy model file"], [], {}


@case
def gen_garbage_model(w, tmp):
    tool, args = _gen(write(tmp / "garbage.andy", GARBAGE))
    return tool, args, ["garbage.andy", "not an andy model file"], [], {}


@case
def gen_truncated_model(w, tmp):
    tool, args = _gen(write(tmp / "cut.andy", w.model.read_bytes()[: w.model.stat().st_size - 1000]))
    return tool, args, ["cut.andy", "truncated"], [], {}


@case
def gen_truncated_header(w, tmp):
    tool, args = _gen(write(tmp / "cut.andy", w.model.read_bytes()[:200]))
    return tool, args, ["cut.andy", "truncated"], [], {}


@case
def gen_altered_model(w, tmp):
    raw = bytearray(w.model.read_bytes())
    raw[-5000] ^= 0x01
    tool, args = _gen(write(tmp / "altered.andy", bytes(raw)))
    return tool, args, ["altered.andy", "altered or corrupted"], [], {}


@case
def gen_plain_safetensors(w, tmp):
    import torch
    from safetensors.torch import save_file

    path = tmp / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    tool, args = _gen(path)
    return tool, args, ["plain.safetensors", "not an andy model file"], [], {}


@case
def gen_pickle_model(w, tmp):
    import torch

    path = tmp / "model.pt"
    torch.save({"w": torch.zeros(2)}, path)
    tool, args = _gen(path)
    return tool, args, ["model.pt", "not an andy model file"], [], {}


@case
def gen_no_prompt(w, tmp):
    return "generate", [w.model], ["--prompt"], [], {}


@case
def gen_missing_prompts_file(w, tmp):
    tool, args = _gen(w.model, "--prompts-file", tmp / "nope.txt")
    return tool, args, ["--prompts-file", "nope.txt"], [], {}


@case
def gen_binary_prompts_file(w, tmp):
    tool, args = _gen(w.model, "--prompts-file", write(tmp / "prompts.txt", GARBAGE))
    return tool, args, ["prompts.txt", "UTF-8"], [], {}


@case
def gen_empty_prompts_file(w, tmp):
    return "generate", [w.model, "--prompts-file", write(tmp / "prompts.txt", b"\n\n")], ["prompt"], [], {}


@case
def gen_ensemble_other_tokenizer(w, tmp):
    tool, args = _gen(w.model, "--ensemble", w.model2)
    return tool, args, ["--ensemble", "model2.andy", "tokenizer"], [], {}


@case
def gen_prompt_too_long(w, tmp):
    return "generate", [w.model, "--prompt", "x = 1\n" * 600], ["prompt", "tokens"], [], {}


for _name, _option, _value in [
    ("temperature_negative", "--temperature", -1),
    ("top_p_zero", "--top-p", 0),
    ("top_p_above_one", "--top-p", 1.5),
    ("top_k_negative", "--top-k", -1),
    ("repetition_penalty_zero", "--repetition-penalty", 0),
    ("batch_size_zero", "--batch-size", 0),
    ("max_new_tokens_zero", "--max-new-tokens", 0),
    ("max_new_tokens_too_many", "--max-new-tokens", 10000),
    ("max_new_tokens_negative", "--max-new-tokens", -4),
    ("device_unknown", "--device", "tpu7"),
]:
    def _make(w, tmp, option=_option, value=_value):
        tool, args = _gen(w.model)
        if option in args:
            args[args.index(option) + 1] = value
        else:
            args += [option, value]
        return tool, args, [option], [], {}

    _make.__name__ = f"gen_{_name}"
    case(_make)


# --- tools/evaluate.py -------------------------------------------------------------------------
@case
def eval_missing_model(w, tmp):
    return "evaluate", [tmp / "nope.andy", "--data", w.shards], ["nope.andy", "does not exist"], [], {}


@case
def eval_garbage_model(w, tmp):
    return ("evaluate", [write(tmp / "garbage.andy", GARBAGE), "--data", w.shards],
            ["garbage.andy", "not an andy model file"], [], {})


@case
def eval_data_of_another_tokenizer(w, tmp):
    return "evaluate", [w.model, "--data", w.shards2], ["shards2", "different tokenizer"], [], {}


@case
def eval_model_of_another_tokenizer(w, tmp):
    return "evaluate", [w.model2, "--data", w.shards], ["different tokenizer"], [], {}


@case
def eval_missing_data(w, tmp):
    return "evaluate", [w.model, "--data", tmp / "nope"], ["nope", "does not exist"], [], {}


@case
def eval_truncated_val_shard(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    shard = data / "val-000000.tar"
    write(shard, shard.read_bytes()[:5000])
    return "evaluate", [w.model, "--data", data], ["val-000000.tar", "truncated"], [], {}


@case
def eval_manifest_garbage(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    write(data / "manifest.json", GARBAGE)
    return "evaluate", [w.model, "--data", data], ["manifest.json", "not valid JSON"], [], {}


@case
def eval_missing_text(w, tmp):
    return "evaluate", [w.model, "--text", tmp / "nope.txt"], ["--text", "nope.txt"], [], {}


@case
def eval_binary_text(w, tmp):
    return "evaluate", [w.model, "--text", write(tmp / "held_out.txt", GARBAGE)], ["held_out.txt", "UTF-8"], [], {}


@case
def eval_empty_text(w, tmp):
    return "evaluate", [w.model, "--text", write(tmp / "held_out.txt", b"")], ["held_out.txt", "no text"], [], {}


@case
def eval_text_is_a_directory(w, tmp):
    return "evaluate", [w.model, "--text", tmp], ["--text"], [], {}


@case
def eval_batch_size_zero(w, tmp):
    return "evaluate", [w.model, "--data", w.shards, "--batch-size", 0], ["--batch-size"], [], {}


@case
def eval_text_batch_size_zero(w, tmp):
    path = write(tmp / "held_out.txt", "import os\n" * 20)
    return "evaluate", [w.model, "--text", path, "--batch-size", 0], ["--batch-size"], [], {}


@case
def eval_no_source(w, tmp):
    return "evaluate", [w.model], ["--data", "--text"], [], {}


@case
def eval_device_unknown(w, tmp):
    return "evaluate", [w.model, "--data", w.shards, "--device", "tpu7"], ["--device"], [], {}


# --- tools/report.py ---------------------------------------------------------------------------
def _report(tmp, run, *extra):
    out = tmp / "out" / "report.html"
    return "report", [run, "-o", out, *extra], out


def _report_case(tmp, run, needles, *extra):
    tool, args, out = _report(tmp, run, *extra)
    return tool, args, needles, [out, out.parent / "report_files"], {}


def _run_copy(w, tmp) -> Path:
    run = tmp / "myrun"
    run.mkdir()
    for name in ("metrics.jsonl", "config.json", "samples.jsonl"):
        if (w.run / name).exists():
            shutil.copy(w.run / name, run / name)
    return run


@case
def report_missing_run(w, tmp):
    return _report_case(tmp, tmp / "nope", ["nope", "no such run directory"])


@case
def report_run_is_a_file(w, tmp):
    return _report_case(tmp, a_file(tmp), ["a_file.txt"])


@case
def report_no_metrics(w, tmp):
    (tmp / "myrun").mkdir()
    return _report_case(tmp, tmp / "myrun", ["myrun", "no metrics.jsonl"])


@case
def report_empty_metrics(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "metrics.jsonl", b"")
    return _report_case(tmp, run, ["metrics.jsonl", "no metrics"])


@case
def report_garbage_metrics(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "metrics.jsonl", GARBAGE + b"\n" + GARBAGE)
    return _report_case(tmp, run, ["metrics.jsonl"])


@case
def report_metrics_without_step(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "metrics.jsonl", '{"loss": 1.0}\n')
    return _report_case(tmp, run, ["metrics.jsonl", "'step'"])


@case
def report_garbage_config(w, tmp):
    run = _run_copy(w, tmp)
    write(run / "config.json", GARBAGE)
    return _report_case(tmp, run, ["config.json"])


@case
def report_output_is_a_directory(w, tmp):
    run = _run_copy(w, tmp)
    (tmp / "outdir").mkdir()
    return "report", [run, "-o", tmp / "outdir"], ["outdir", "directory"], [], {tmp / "outdir": {}}


@case
def report_output_under_a_file(w, tmp):
    run = _run_copy(w, tmp)
    return "report", [run, "-o", a_file(tmp) / "report.html"], ["a_file.txt"], [], {}


@case
def report_failure_keeps_previous(w, tmp):
    out = write(tmp / "out" / "report.html", "<p>previous report</p>")
    (tmp / "myrun").mkdir()
    return "report", [tmp / "myrun", "-o", out], ["no metrics.jsonl"], [], {out: b"<p>previous report</p>"}


# ---------------------------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    tool, args, needles, absent, untouched = CASES[name](world, tmp_path)
    assert_user_error(run_here(tool, *args), *needles, absent=absent, untouched=untouched)


# ---------------------------------------------------------------------------------------------
# End to end in a real process: exit status 2, one "error:" line, no traceback


PROCESS_CASES = {
    "train_tokenizer": "tok_garbage_txt",
    "make_shards": "shards_val_fraction_above_one",
    "train": "train_tokenizer_mismatch",
    "export": "export_truncated_optim_states",
    "generate": "gen_truncated_model",
    "evaluate": "eval_data_of_another_tokenizer",
    "report": "report_no_metrics",
    "import_hf": "import_hf_other_family",
}


@pytest.mark.parametrize("tool", list(PROCESS_CASES))
def test_bad_input_in_a_real_process(world, tmp_path, tool):
    name = PROCESS_CASES[tool]
    got_tool, args, needles, absent, untouched = CASES[name](world, tmp_path)
    assert got_tool == tool
    result = run_process(tool, *args)
    assert_user_error(result, *needles, absent=absent, untouched=untouched)
    assert len([line for line in result.err.splitlines() if line.startswith("error:")]) == 1


def test_resume_of_another_model_stops_before_training(world, tmp_path):
    """Caught after the process group starts (it needs the checkpoint): still one line, exit 2."""
    run = Path(shutil.copytree(world.run, tmp_path / "run"))
    before = _snapshot(run / "checkpoints")
    args = world.train_args(run, "--max-steps", 4, "--resume")
    args[args.index("model.d_model=32")] = "model.d_model=64"
    result = train("python", args, nproc=1, check=False, timeout=300)
    assert_user_error(Result(result.returncode, result.stdout, result.stderr), "was saved for model", "d_model",
                      untouched={run / "checkpoints": before})


def test_resume_refuses_a_checkpoint_carrying_code(world, tmp_path):
    """DeepSpeed's loader unpickles with weights_only=False; --resume vets every file first."""
    import torch

    run = Path(shutil.copytree(world.run, tmp_path / "run"))
    tag_dir = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    marker = tmp_path / "pwned"
    states = tag_dir / "mp_rank_00_model_states.pt"
    torch.save({"module": _Payload(str(marker))}, states)
    meta = json.loads((tag_dir / "andy_meta.json").read_text())
    meta["files"][states.name] = states.stat().st_size  # as if written so: only the content is hostile
    write(tag_dir / "andy_meta.json", json.dumps(meta))
    result = train("python", world.train_args(run, "--max-steps", 4, "--resume"), nproc=1, check=False, timeout=300)
    assert_user_error(Result(result.returncode, result.stdout, result.stderr), "mp_rank_00_model_states.pt",
                      "safely", absent=[marker])


# ---------------------------------------------------------------------------------------------
# An existing output: replaced atomically by a finished one; a crash leaves it as it was


def test_outputs_are_replaced_by_finished_ones(world, tmp_path):
    from andy_dist.infer.model_file import load_model_file
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.tokenizer import Tokenizer

    model = write(tmp_path / "model.andy", b"an older export")
    assert run_here("export", "--fp32", world.ckpt, "-o", model).code == 0
    assert load_model_file(model)[2]["quantization"]["scheme"] == "none"

    tok_dir = Path(shutil.copytree(world.tok.parent, tmp_path / "tok"))
    corpus = write(tmp_path / "small.txt", "".join(f"line {i}: the quick brown fox {i * i}\n" for i in range(300)))
    assert run_here("train_tokenizer", "--input", corpus, "--vocab-size", 300, "--out", tok_dir).code == 0
    assert Tokenizer.from_file(tok_dir).vocab_size == 300

    shards = copy_shards(world.shards2, tmp_path / "set")
    result = run_here("make_shards", "--input", world.corpus, "--tokenizer", world.tok, "--out", shards,
                      "--workers", 1, "--max-seq-len", 64, "--val-fraction", 0.05)
    assert result.code == 0, result.err
    assert open_shards(shards, tokenizer=world.tok, verify="size").vocab_size == 2000

    report = write(tmp_path / "report.html", "<p>old</p>")
    assert run_here("report", world.run, "-o", report).code == 0
    assert b"<p>old</p>" not in report.read_bytes()
    assert leftovers(tmp_path) == []


def test_payload_runs_when_unpickled(tmp_path):
    """The check the pickle cases rely on: unpickling `_Payload` does run code."""
    import pickle

    pickle.loads(pickle.dumps(_Payload(str(tmp_path / "ran"))))
    assert (tmp_path / "ran").exists()


def test_crash_while_writing_leaves_the_previous_output(world, tmp_path, monkeypatch):
    import andy_dist.infer.model_file
    import andy_dist.data.shard_writer
    from andy_dist.infer.export import load_checkpoint_weights
    from andy_dist.config import ModelConfig
    from andy_dist.data.tokenizer import Tokenizer

    def half_then_crash(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a model")
        raise RuntimeError("simulated crash in the middle of the write")

    model = write(tmp_path / "model.andy", b"the previous export")
    state, meta = load_checkpoint_weights(world.ckpt)
    monkeypatch.setattr(andy_dist.infer.model_file, "save_file", half_then_crash)
    with pytest.raises(RuntimeError, match="simulated"):
        andy_dist.infer.model_file.save_model_file(model, state, ModelConfig.from_dict(meta["model_config"]),
                                            Tokenizer.from_file(world.tok))
    assert model.read_bytes() == b"the previous export" and leftovers(tmp_path) == []

    calls = {"n": 0}
    real_write_chunk = andy_dist.data.shard_writer._write_chunk

    def crash_on_second_chunk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash while writing shards")
        return real_write_chunk(*args, **kwargs)

    shards = copy_shards(world.shards2, tmp_path / "set")
    before = _snapshot(shards)
    monkeypatch.setattr(andy_dist.data.shard_writer, "_write_chunk", crash_on_second_chunk)
    with pytest.raises(RuntimeError, match="simulated"):
        andy_dist.data.shard_writer.write_shards([world.corpus], world.tok, shards, workers=1, max_seq_len=64, progress=False)
    assert _snapshot(shards) == before and leftovers(tmp_path) == []
