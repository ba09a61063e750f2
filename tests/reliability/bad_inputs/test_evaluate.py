"""tools/evaluate.py: bad model files, shard sets of another tokenizer or damaged ones, bad held-out
text and impossible settings.
"""

from __future__ import annotations

import pytest

from tests.reliability.bad_inputs.runner import (
    GARBAGE,
    Cases,
    check_in_a_real_process,
    check_in_this_process,
    copy_shards,
    write,
)

pytestmark = [pytest.mark.slow]

CASES = Cases()
case = CASES.add


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
def eval_data_url_of_an_unknown_protocol(w, tmp):
    return "evaluate", [w.model, "--data", "nosuch://bucket/shards"], ["cannot open nosuch://bucket/shards"], [], {}


@case
def eval_storage_options_not_json(w, tmp):
    return ("evaluate", [w.model, "--data", "s3://bucket/shards", "--storage-options", "{endpoint"],
            ["--storage-options", "not valid JSON"], [], {})


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


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_line_error(world, tmp_path, name):
    check_in_this_process(CASES[name], world, tmp_path)


def test_bad_input_in_a_real_process(world, tmp_path):
    """End to end in a real process: exit status 2, one "error:" line, no traceback."""
    check_in_a_real_process(CASES["eval_data_of_another_tokenizer"], "evaluate", world, tmp_path)


def test_a_url_gives_the_figures_of_the_local_copy(world, tmp_path):
    """--data http://... (Python's http.server serving the shard folder) reads through the node cache and
    gives exactly the figures of the local folder."""
    import json

    from tests.reliability.bad_inputs.runner import run_here
    from tests.servers import FileServer

    local = run_here("evaluate", world.model, "--data", world.shards, "--json")
    with FileServer(world.shards) as server:
        remote = run_here("evaluate", world.model, "--data", server.url, "--json", "--cache-dir", tmp_path / "cache")
    assert local.code == 0 and remote.code == 0, remote.err[-2000:]
    figures = [json.loads(result.out[result.out.index("{"):]) for result in (local, remote)]
    assert figures[0]["loss"] == figures[1]["loss"] and figures[0]["target_tokens"] == figures[1]["target_tokens"]
    assert server.count("val-000000.tar") == 1
