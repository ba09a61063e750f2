"""tools/import_hf.py: a missing directory, another model family, pickled or truncated weights, a missing or
mismatched tokenizer, a GPT-2 variant we cannot express."""

from __future__ import annotations

import json

import pytest

from tests.reliability.bad_inputs.hf_inputs import hf_copy, hf_dir, other_family
from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    check_in_a_real_process,
    check_in_this_process,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


def _import(hf, tmp, *extra):
    out = tmp / "imported.andy"
    return "import_hf", [hf, "--out", out, *extra], out


@case
def import_hf_missing_directory(w, tmp):
    tool, args, out = _import(tmp / "nope", tmp)
    return tool, args, ["nope", "not a directory"], [out], {}


@case
def import_hf_other_family(w, tmp):
    tool, args, out = _import(other_family(tmp), tmp)
    return tool, args, ["'llama'", "not GPT-2"], [out], {}


@case
def import_hf_pickle_only(w, tmp):
    hf = hf_copy(w, tmp, drop=["model.safetensors"])
    write(hf / "pytorch_model.bin", GARBAGE)
    tool, args, out = _import(hf, tmp)
    return tool, args, ["pytorch_model.bin", "pickle"], [out], {}


@case
def import_hf_truncated_weights(w, tmp):
    hf = hf_copy(w, tmp)
    data = (hf / "model.safetensors").read_bytes()
    write(hf / "model.safetensors", data[: len(data) // 2])
    tool, args, out = _import(hf, tmp)
    return tool, args, ["model.safetensors", "not a readable safetensors"], [out], {}


@case
def import_hf_missing_tokenizer(w, tmp):
    tool, args, out = _import(hf_copy(w, tmp, drop=["tokenizer.model"]), tmp)
    return tool, args, ["no tokenizer.model", "--tokenizer"], [out], {}


@case
def import_hf_tokenizer_of_another_size(w, tmp):
    tool, args, out = _import(hf_dir(w), tmp, "--tokenizer", w.tok2)
    return tool, args, ["600 pieces", "2000"], [out], {}


@case
def import_hf_unsupported_gpt2_variant(w, tmp):
    hf = hf_copy(w, tmp)
    config = json.loads((hf / "config.json").read_text())
    write(hf / "config.json", json.dumps(dict(config, scale_attn_by_inverse_layer_idx=True)))
    tool, args, out = _import(hf, tmp)
    return tool, args, ["scale_attn_by_inverse_layer_idx"], [out], {}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["import_hf_other_family"], "import_hf", world, tmp_path)
