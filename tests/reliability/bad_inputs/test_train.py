"""launch/train.py: damaged or mismatched shard sets, tokenizers, configs and output folders.

The cases run in this process and must be caught before the process group starts (`run_here` puts a
tripwire on init_distributed). The mistakes only a started run can catch (resuming the checkpoint of
another model, or one carrying code) are real training launches at the end.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from tests.launching import train
from tests.reliability.bad_inputs.hf_inputs import hf_dir, other_family
from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    Payload,
    Result,
    a_file,
    assert_user_error,
    check_in_a_real_process,
    check_in_this_process,
    copy_shards,
    run_here,
    snapshot,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


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
    # Hashed at start-up with data_verify=full; the default (once) hashes each shard before its first read,
    # after the process group started (tests/unit/data/test_remote.py::test_local_shards_are_hashed_once_...).
    return _train_case(w, tmp, ["train-000000.tar", "sha256"], "data_verify=full", data=data)


@case
def train_shard_replaced_by_garbage(w, tmp):
    data = copy_shards(w.shards, tmp / "set")
    shard = data / "val-000000.tar"
    write(shard, (GARBAGE * 100)[: shard.stat().st_size])
    return _train_case(w, tmp, ["val-000000.tar", "corrupt"], "data_verify=full", data=data)


def poison_shard(shards: Path, split: str, marker: Path) -> Path:
    """Append a pickle member (`99999999.pyd`) to a shard and fix the manifest's size and sha256 to match."""
    import hashlib
    import pickle
    import tarfile

    shard = shards / f"{split}-000000.tar"
    payload = pickle.dumps(Payload(str(marker)))
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
    # Only a full check reads the extra member (and refuses it); training never reads it at all.
    tool, args, out = _train(w, tmp, "data_verify=full", data=data)
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
    return tool, args, ["--out", "a_file.txt"], [], {out: snapshot(out)}


@case
def train_out_under_a_file(w, tmp):
    tool, args, _ = _train(w, tmp)
    args[args.index("--out") + 1] = a_file(tmp) / "run"
    return tool, args, ["--out", "a_file.txt"], [], {}


# --- init_from= and shard sets without their tokenizer -------------------------------------------
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
    return _train_case(w, tmp, ["fixes the model's shape", "model.n_layers=5"], f"init_from={hf_dir(w)}",
                       "model.n_layers=5")


@case
def train_init_from_other_family(w, tmp):
    return _train_case(w, tmp, ["'llama'", "not GPT-2"], f"init_from={other_family(tmp)}")


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["train_tokenizer_mismatch"], "train", world, tmp_path)


def test_resume_of_another_model_stops_before_training(world, tmp_path):
    """Caught after the process group starts (it needs the checkpoint): still one line, exit 2."""
    run = Path(shutil.copytree(world.run, tmp_path / "run"))
    before = snapshot(run / "checkpoints")
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
    torch.save({"module": Payload(str(marker))}, states)
    meta = json.loads((tag_dir / "andy_meta.json").read_text())
    meta["files"][states.name] = states.stat().st_size  # as if written so: only the content is hostile
    write(tag_dir / "andy_meta.json", json.dumps(meta))
    result = train("python", world.train_args(run, "--max-steps", 4, "--resume"), nproc=1, check=False, timeout=300)
    assert_user_error(Result(result.returncode, result.stdout, result.stderr), "mp_rank_00_model_states.pt",
                      "safely", absent=[marker])


def test_resume_of_a_zero0_bf16_checkpoint_from_deepspeeds_wrapper_says_how_to_go_on(world, tmp_path):
    """ZeRO-0 bf16 used to run through DeepSpeed's bf16 optimizer wrapper; it now runs as autocast over fp32
    weights, whose optimizer state differs. Resuming such a checkpoint (written for real by the wrapper) is
    one line naming the way on, before DeepSpeed fails on a missing key; and that way works."""
    import subprocess
    import sys

    from tests.launching import ROOT, cpu_env, free_port

    run = tmp_path / "run"
    src_tag = world.ckpt / (world.ckpt / "latest").read_text().strip()
    made = subprocess.run([sys.executable, str(ROOT / "tests/e2e/scripts/legacy_zero0_bf16.py"), str(src_tag),
                           str(run / "checkpoints"), str(tmp_path / "masters.safetensors")],
                          env=cpu_env(MASTER_PORT=str(free_port())), capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    before = snapshot(run / "checkpoints")
    bf16_zero0 = ("precision=bf16", "zero_stage=0")
    result = train("python", [*world.train_args(run, "--max-steps", 4, "--resume"), *bf16_zero0], nproc=1,
                   check=False, timeout=300)
    assert_user_error(Result(result.returncode, result.stdout, result.stderr), "bf16 optimizer wrapper",
                      "init_from=model.andy", untouched={run / "checkpoints": before})
    model = tmp_path / "model.andy"
    exported = run_here("export", "--fp32", run / "checkpoints", "--tag", "step-000001", "-o", model)
    assert exported.code == 0, exported.err
    train("python", [*world.train_args(tmp_path / "again", "--max-steps", 1, f"init_from={model}"), *bf16_zero0],
          nproc=1, timeout=300)
