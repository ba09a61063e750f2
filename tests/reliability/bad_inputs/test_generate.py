"""tools/generate.py: missing, empty, truncated, altered or foreign model files, bad prompts and
impossible sampling settings.
"""

from __future__ import annotations

import pytest

from tests.reliability.bad_inputs.runner import GARBAGE, Cases, check_in_a_real_process, check_in_this_process, write

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


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


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["gen_truncated_model"], "generate", world, tmp_path)
