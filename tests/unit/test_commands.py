"""Tools installed like tools: each console command is the same program as its script, no tool edits sys.path,
and a shard set carries its tokenizer (--data alone trains; an older set without the copy still trains with
--tokenizer)."""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from andy_dist import UserError
from tests.launching import ROOT, cpu_env

SCRIPTS = {
    "andy-train": "launch/train.py",
    "andy-shards": "tools/make_shards.py",
    "andy-tokenizer": "tools/train_tokenizer.py",
    "andy-export": "tools/export.py",
    "andy-generate": "tools/generate.py",
    "andy-evaluate": "tools/evaluate.py",
    "andy-report": "tools/report.py",
    "andy-import-hf": "tools/import_hf.py",
    "andy-sweep": "tools/sweep.py",
}


def test_every_console_command_runs_the_function_its_script_runs():
    commands = {ep.name: ep for ep in entry_points(group="console_scripts") if ep.name.startswith("andy-")}
    assert set(commands) == set(SCRIPTS), "pip install -e . installs exactly these commands (setup.cfg)"
    for name, script in SCRIPTS.items():
        shim = runpy.run_path(str(ROOT / script), run_name="not_main")  # imports, does not run
        assert shim["run"] is commands[name].load(), f"{script} and {name} run different programs"


def test_no_tool_edits_sys_path():
    files = [*ROOT.glob("tools/*.py"), *ROOT.glob("tools/benchmarks/*.py"), ROOT / "launch/train.py",
             *ROOT.glob("andy_dist/commands/*.py")]
    offenders = [str(f.relative_to(ROOT)) for f in files if re.search(r"sys\.path\.(insert|append)", f.read_text())]
    assert len(files) > 15 and offenders == []


def test_a_console_command_and_its_script_print_the_same_help():
    exe = Path(sys.executable).parent / "andy-evaluate"
    if not exe.exists():
        pytest.skip("andy_dist is not pip-installed in this interpreter's environment")
    outputs = [subprocess.run(cmd, cwd=ROOT, env=cpu_env(), capture_output=True, text=True, timeout=120)
               for cmd in ([str(exe), "--help"], [sys.executable, str(ROOT / "tools/evaluate.py"), "--help"])]
    assert all(o.returncode == 0 for o in outputs), [o.stderr for o in outputs]
    progs = ("andy-evaluate", "evaluate.py")
    words = [" ".join(o.stdout.replace(prog, "PROG", 1).split()) for o, prog in zip(outputs, progs)]
    assert words[0] == words[1] and "--ensemble" in words[0]  # the same text, however argparse wraps the name


def test_make_shards_copies_the_tokenizer_the_manifest_names(train_shards, tokenizer):
    import hashlib
    import json

    copy = (train_shards / "tokenizer.model").read_bytes()
    assert copy == tokenizer.model_bytes
    manifest = json.loads((train_shards / "manifest.json").read_text())
    assert manifest["tokenizer"]["sha256"] == hashlib.sha256(copy).hexdigest()


class _ReachedTheProcessGroup(Exception):
    pass


def _train_until_the_process_group(monkeypatch, *args):
    """Run launch/train.py's train() in this process up to init_distributed: every data check passed by then."""
    import andy_dist.train.engine

    def stop(*_args, **_kwargs):
        raise _ReachedTheProcessGroup

    monkeypatch.setattr(andy_dist.train.engine, "init_distributed", stop)
    from andy_dist.train.run import train

    return train(["--ds_config", str(ROOT / "ds_configs/tiny.json"), *map(str, args), "model.vocab_size=2000",
                  "precision=fp32", "wandb=disabled"])


def test_data_alone_names_the_tokenizer(train_shards, tmp_path, monkeypatch):
    with pytest.raises(_ReachedTheProcessGroup):
        _train_until_the_process_group(monkeypatch, "--data", train_shards, "--out", tmp_path / "run")


def test_an_older_shard_set_without_the_copy_trains_with_tokenizer(train_shards, tokenizer_path, tmp_path,
                                                                   monkeypatch):
    old = Path(shutil.copytree(train_shards, tmp_path / "old"))
    (old / "tokenizer.model").unlink()
    with pytest.raises(UserError, match="no tokenizer at .*--tokenizer"):
        _train_until_the_process_group(monkeypatch, "--data", old, "--out", tmp_path / "run")
    with pytest.raises(_ReachedTheProcessGroup):
        _train_until_the_process_group(monkeypatch, "--data", old, "--tokenizer", tokenizer_path,
                                       "--out", tmp_path / "run")
