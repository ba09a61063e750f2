"""The shared runner of the bad-input tests: every user mistake ends in one clear line, exit status 2,
no traceback, and no output file or folder left half-written (a previous output stays untouched).

The tools run in this process through `runpy` (as `python tools/X.py ...` would run them, including
`run_tool`'s handling of `UserError`), so one torch import serves some 130 cases: an exception that
escapes the tool fails the test as "a traceback the user would see". One case per tool also runs
as a real subprocess, to check the exit status and stderr end to end. launch/train.py runs in this
process only for mistakes caught before the process group starts (`init_distributed` is replaced by
a tripwire); the mistakes caught after it are real training launches (test_train.py).

Each test_<tool>.py holds that tool's cases in a `Cases` registry. A case builds its bad input under
`tmp` and returns (tool, args, words the error line must hold, paths that must not exist, paths that
must not change); `check_in_this_process` and `check_in_a_real_process` run it and check all of that.
The artefacts the cases start from (`World`) are built once per session in conftest.py.
"""

from __future__ import annotations

import io
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

from tests.launching import ROOT, cpu_env

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
        assert snapshot(path) == content, f"{path} was changed by a failed run\n{context}"


def snapshot(path: Path):
    path = Path(path)
    if path.is_dir():
        return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------
# Real artefacts (built once per session: conftest.py's `world`) and files made from them


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


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)
    return path


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def a_file(tmp: Path) -> Path:
    return write(tmp / "a_file.txt", "some text\n")


class Payload:
    """Unpickling it creates the file `path`: proof that a loader ran code from a file."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


# ---------------------------------------------------------------------------------------------
# The cases of one tool, and the two ways to run one


class Cases(dict):
    """A tool's cases by name; `case = CASES.add` makes `@case` register a function under its name."""

    def add(self, fn):
        self[fn.__name__] = fn
        return fn


def check_in_this_process(case, world: World, tmp: Path) -> None:
    tool, args, needles, absent, untouched = case(world, tmp)
    assert_user_error(run_here(tool, *args), *needles, absent=absent, untouched=untouched)


def check_in_a_real_process(case, tool: str, world: World, tmp: Path) -> None:
    """The case run as `python tools/X.py ...`: exit status 2, one "error:" line, no traceback."""
    got_tool, args, needles, absent, untouched = case(world, tmp)
    assert got_tool == tool
    result = run_process(tool, *args)
    assert_user_error(result, *needles, absent=absent, untouched=untouched)
    assert len([line for line in result.err.splitlines() if line.startswith("error:")]) == 1
