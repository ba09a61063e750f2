"""The packages' exports: one import path per name, every name where its package says, and light imports
(none of `andy_dist.data`, `andy_dist.train`, `andy_dist.infer` imports DeepSpeed, even with every
exported name loaded: the engine imports it inside its functions)."""

from __future__ import annotations

import importlib
import inspect
import json
import subprocess
import sys

import pytest

PACKAGES = ("andy_dist.data", "andy_dist.train", "andy_dist.infer")


def test_no_name_is_exported_twice():
    exported = [name for package in PACKAGES for name in importlib.import_module(package).__all__]
    assert sorted(exported) == sorted(set(exported))


@pytest.mark.parametrize("package", PACKAGES)
def test_every_export_is_defined_in_its_package(package):
    module = importlib.import_module(package)
    assert module.__all__ and set(module.__all__) <= set(dir(module))
    for name in module.__all__:
        value = getattr(module, name)
        home = inspect.getmodule(value)
        if home is not None and (inspect.isclass(value) or inspect.isfunction(value)):
            assert home.__name__.startswith(package + "."), (name, home.__name__)
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        getattr(module, "no_such_name")


def test_the_stream_does_not_re_export_the_reader():
    import andy_dist.data.stream as stream

    assert not hasattr(stream, "open_shards")
    assert not {"open_shards", "ShardSet", "SeqLenSchedule"} & set(stream.__all__)


def test_the_packages_and_all_their_exports_load_without_deepspeed(root):
    code = ("import importlib, json, sys\n"
            f"for package in {PACKAGES!r}:\n"
            "    module = importlib.import_module(package)\n"
            "    for name in module.__all__:\n"
            "        getattr(module, name)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'deepspeed')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == []
