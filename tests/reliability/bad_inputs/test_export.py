"""tools/export.py: missing, truncated, altered or hostile checkpoints, a mismatched tokenizer and bad
output paths; a failed export keeps the previous model file.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.reliability.bad_inputs.hf_inputs import other_family
from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    Payload,
    a_file,
    check_in_a_real_process,
    check_in_this_process,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


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
    torch.save({"module": Payload(str(marker))}, ckpt / "step-000002" / "mp_rank_00_model_states.pt")
    tool, args, out = _export(w, tmp, ckpt=ckpt)
    return tool, args, ["mp_rank_00_model_states.pt", "safely"], [out, marker], {}


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


# --- --hf, --from, --average ------------------------------------------------------------------
@case
def export_hf_into_a_non_empty_directory(w, tmp):
    out = write(tmp / "hf" / "notes.txt", "mine")
    return ("export", ["--hf", out.parent, w.ckpt], ["hf", "not empty", "--force"], [],
            {out.parent: {"notes.txt": b"mine"}})


@case
def export_hf_from_another_model_family(w, tmp):
    return ("export", ["--hf", tmp / "out", other_family(tmp)], ["llama", "not an andy_dist checkpoint"],
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


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["export_truncated_optim_states"], "export", world, tmp_path)


def test_payload_runs_when_unpickled(tmp_path):
    """The check the pickle cases rely on: unpickling `Payload` does run code."""
    import pickle

    pickle.loads(pickle.dumps(Payload(str(tmp_path / "ran"))))
    assert (tmp_path / "ran").exists()
