"""The checkpoint format has one home (`andy_dist.train.checkpoint_format`) and one version rule, used by
both readers: resuming (`andy_dist.train.checkpoint`) and exporting (`andy_dist.infer.export`).

Checkpoints here are real files: a ZeRO-0 layout (`mp_rank_00_model_states.pt` holding the module's
weights) written with torch.save and marked complete by the format's own `write_meta`.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from andy_dist import UserError
from andy_dist.config import ModelConfig
from andy_dist.infer.export import load_checkpoint_weights
from andy_dist.model import AndyLM
from andy_dist.train import checkpoint_format as fmt
from andy_dist.train.checkpoint import find_resume, load_meta

CFG = ModelConfig(vocab_size=300, d_model=16, n_heads=2, n_layers=1, max_seq_len=16, dropout=0.0)


def make_tag(ckpt: Path, tag: str, **meta) -> Path:
    """A complete tag: the module's weights as DeepSpeed's ZeRO-0 model states file, then the meta."""
    tag_dir = ckpt / tag
    tag_dir.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save({"module": AndyLM(CFG).state_dict()}, tag_dir / "mp_rank_00_model_states.pt")
    fmt.write_meta(tag_dir, {"model_config": CFG.to_dict(), "tag": tag, "trainer_state": {"step": 1}, **meta})
    return tag_dir


def set_format(tag_dir: Path, version) -> None:
    path = tag_dir / fmt.META_FILE
    meta = json.loads(path.read_text())
    if version is None:
        del meta["format"]
    else:
        meta["format"] = version
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# One version rule, for both readers

READERS = {
    "resume": lambda ckpt, tag: load_meta(ckpt, tag).meta,
    "export": lambda ckpt, tag: load_checkpoint_weights(ckpt, tag)[1],
}


@pytest.mark.parametrize("reader", READERS)
def test_the_current_format_is_read(tmp_path, reader):
    make_tag(tmp_path, "step-000001")
    assert READERS[reader](tmp_path, "step-000001")["format"] == fmt.FORMAT_VERSION


@pytest.mark.parametrize("reader", READERS)
def test_an_older_format_is_read(tmp_path, monkeypatch, reader):
    """A later andy_dist (format 2 here) still reads what this one writes (format 1)."""
    make_tag(tmp_path, "step-000001")
    monkeypatch.setattr(fmt, "FORMAT_VERSION", 2)
    assert READERS[reader](tmp_path, "step-000001")["format"] == 1


@pytest.mark.parametrize("reader", READERS)
def test_a_newer_format_asks_for_an_upgrade(tmp_path, reader):
    newer = fmt.FORMAT_VERSION + 1
    set_format(make_tag(tmp_path, "step-000001"), newer)
    with pytest.raises(UserError, match=rf"format {newer}, newer than this version reads \({newer - 1}\); "
                                        rf"upgrade andy_dist") as err:
        READERS[reader](tmp_path, "step-000001")
    assert fmt.META_FILE in str(err.value)


@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("version", [None, 0, "1", 1.0, True, [1]])
def test_a_missing_or_garbage_format_is_damage(tmp_path, reader, version):
    set_format(make_tag(tmp_path, "step-000001"), version)
    with pytest.raises(UserError, match="no valid format version.*damaged"):
        READERS[reader](tmp_path, "step-000001")


@pytest.mark.parametrize("content, needle", [
    (b"\xff\xfe not json", "not valid JSON"),
    (b"[1, 2]", "no model_config"),
    (json.dumps({"format": 1}).encode(), "no model_config"),
    (json.dumps({"format": 1, "model_config": {}, "files": ["x"]}).encode(), "damaged file list"),
])
def test_a_damaged_meta_is_named(tmp_path, content, needle):
    tag_dir = make_tag(tmp_path, "step-000001")
    (tag_dir / fmt.META_FILE).write_bytes(content)
    with pytest.raises(UserError, match=needle) as err:
        fmt.read_meta(tag_dir)
    assert str(tag_dir / fmt.META_FILE) in str(err.value)


def test_a_tag_without_meta_is_not_a_checkpoint(tmp_path):
    (tmp_path / "step-000001").mkdir()
    with pytest.raises(UserError, match=f"has no {fmt.META_FILE}"):
        fmt.read_meta(tmp_path / "step-000001")


# ---------------------------------------------------------------------------------------------
# The meta's file list


def test_the_meta_lists_every_file_with_its_size(tmp_path):
    tag_dir = make_tag(tmp_path, "step-000001")
    meta = fmt.read_meta(tag_dir)
    states = tag_dir / "mp_rank_00_model_states.pt"
    assert meta["files"] == {states.name: states.stat().st_size} and meta["format"] == fmt.FORMAT_VERSION
    fmt.check_file_sizes(tag_dir, meta)
    states.write_bytes(states.read_bytes()[:100])
    with pytest.raises(UserError, match="is truncated or altered"):
        fmt.check_file_sizes(tag_dir, meta)
    states.unlink()
    with pytest.raises(UserError, match=f"{states.name} is missing"):
        fmt.check_file_sizes(tag_dir, meta)


# ---------------------------------------------------------------------------------------------
# Tags and `latest`


def test_tags_listed_are_the_complete_ones(tmp_path):
    for step in (12, 3):
        make_tag(tmp_path, fmt.step_tag(step))
    make_tag(tmp_path, fmt.BEST_TAG)
    (tmp_path / "step-000020").mkdir()  # a save that did not finish: no meta
    assert fmt.complete_tags(tmp_path) == ["best", "step-000003", "step-000012"]
    assert fmt.complete_step_tags(tmp_path) == [(3, "step-000003"), (12, "step-000012")]
    assert fmt.complete_tags(tmp_path / "absent") == [] and fmt.complete_step_tags(tmp_path / "absent") == []


def test_latest_is_read_resolved_and_resumed(tmp_path):
    make_tag(tmp_path, "step-000003")
    make_tag(tmp_path, "step-000012")
    assert fmt.read_latest(tmp_path) is None
    assert find_resume(tmp_path).tag == "step-000012"  # no latest: the newest complete step tag
    fmt.write_latest(tmp_path, "step-000003")
    assert fmt.read_latest(tmp_path) == "step-000003"
    assert find_resume(tmp_path).tag == "step-000003"
    assert fmt.resolve_checkpoint(tmp_path) == (tmp_path, "step-000003")
    assert fmt.resolve_checkpoint(tmp_path, "step-000012") == (tmp_path, "step-000012")


@pytest.mark.parametrize("content", [b"\xff\xfe\x00garbage", b"", b"../../etc"])
def test_a_damaged_latest_is_named_with_the_fix(tmp_path, content):
    make_tag(tmp_path, "step-000003")
    (tmp_path / fmt.LATEST_FILE).write_bytes(content)
    with pytest.raises(UserError, match=r"latest does not hold a tag name.*write the tag to use into it"):
        fmt.read_latest(tmp_path)
    with pytest.raises(UserError, match=r"latest does not hold a tag name.*pass --tag with one of \['step-000003'\]"):
        fmt.resolve_checkpoint(tmp_path)


def test_a_run_directory_resolves_to_its_checkpoints(tmp_path):
    ckpt = tmp_path / "checkpoints"
    make_tag(ckpt, "step-000003")
    with pytest.raises(UserError, match=r"no 'latest' file; pass --tag with one of \['step-000003'\]"):
        fmt.resolve_checkpoint(tmp_path)
    assert fmt.resolve_checkpoint(tmp_path, "step-000003") == (ckpt, "step-000003")
    with pytest.raises(UserError, match="'step-000009' is not in .*available tags: \\['step-000003'\\]"):
        fmt.resolve_checkpoint(tmp_path, "step-000009")


# ---------------------------------------------------------------------------------------------
# Safe loading


class _Code:
    def __reduce__(self):
        return (print, ("unpickled",))


def test_only_tensors_and_deepspeeds_plain_classes_load(tmp_path):
    tag_dir = make_tag(tmp_path, "step-000001")
    fmt.verify_checkpoint_files(tag_dir)
    torch.save({"module": _Code()}, tag_dir / "hostile.pt")
    with pytest.raises(UserError, match="hostile.pt safely"):
        fmt.verify_checkpoint_files(tag_dir)


# ---------------------------------------------------------------------------------------------
# What the format module and training import


def test_the_format_imports_neither_deepspeed_nor_the_engine_nor_export(root):
    code = ("import sys, json\nimport andy_dist.train.checkpoint_format\n"
            "print(json.dumps([m for m in sys.modules if m.split('.')[0] == 'deepspeed' "
            "or m in ('andy_dist.train.engine', 'andy_dist.infer.export')]))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []


def test_training_does_not_import_the_export_module(root):
    """Every import statement in andy_dist/train, at module level or inside a function."""
    found = []
    for path in sorted((root / "andy_dist" / "train").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            found += [f"{path.name}: {name}" for name in names if name.startswith("andy_dist.infer.export")]
    assert found == []
