"""The sweep's parts in one process: the space file, its checks against the trainer's own config, the
journal storage's heartbeat (a dead worker's trial is failed and re-queued once), the budget count,
the summary (table, best.yaml that the config loader accepts, the HTML page with Optuna's plots), and
bad input to tools/sweep.py: one line, exit 2, no trial started.

Real components: Optuna's journal file storage, the trainer's `plan_run`, the session's real shards.
No training runs here (those are in tests/e2e/test_sweep.py).
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import optuna
import pytest

from andy_dist import UserError
from andy_dist.cli import run_tool
from andy_dist.sweep import cli as sweep_cli
from andy_dist.sweep.checks import check_space
from andy_dist.sweep.driver import Tally
from andy_dist.sweep.space import load_space, override
from andy_dist.sweep.storage import JOURNAL_NAME, fail_dead_trials, heartbeat, open_storage
from andy_dist.sweep.summary import format_table, trial_rows, write_best_yaml
from andy_dist.train.settings import load_train_config
from tests.launching import ROOT, cpu_env

TINY = str(ROOT / "ds_configs" / "tiny.json")


def space_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------------------------- the space file


def test_space_file_kinds_fixed_settings_and_first_points(tmp_path):
    space = load_space(space_file(tmp_path, """
ds_config: ds_configs/tiny.json
fixed: {eval_interval: 50, model: {dropout: 0.0}, lr_decay_steps: 400}
params:
  lr: {low: 1e-4, high: 3.0e-3, log: true}
  warmup_steps: {low: 20, high: 100, step: 20}
  weight_decay: {low: 0, high: 0.1}
  grad_clip: {low: 1, high: 2, type: float}
  precision: [bf16, fp32]
first:
  - {lr: 3.0e-4, precision: fp32}
"""))
    kinds = {p.name: (p.kind, p.low, p.high, p.log) for p in space.params}
    assert kinds == {"lr": ("float", 1e-4, 3e-3, True), "warmup_steps": ("int", 20, 100, False),
                     "weight_decay": ("float", 0.0, 0.1, False), "grad_clip": ("float", 1.0, 2.0, False),
                     "precision": ("categorical", None, None, False)}
    assert space.fixed == {"eval_interval": 50, "model.dropout": 0.0, "lr_decay_steps": 400}
    assert space.first == ({"lr": 3e-4, "precision": "fp32"},)
    assert space.ds_config == "ds_configs/tiny.json"
    assert next(p for p in space.params if p.name == "warmup_steps").grid() == [20, 40, 60, 80, 100]
    lr = 10 ** -4.3
    overrides = space.overrides({"lr": lr, "precision": "bf16", "model.tie_embeddings": True})
    assert overrides[-3:] == [f"lr={lr!r}", "precision=bf16", "model.tie_embeddings=true"]
    cfg = load_train_config(None, overrides)  # the trainer reads back exactly what was sampled
    assert cfg.optim.lr == lr and cfg.model == {"dropout": 0.0, "tie_embeddings": True}
    assert override("sample_prompts", []) == "sample_prompts=[]"


@pytest.mark.parametrize("text, needle", [
    ("params: {lr: [1, 2]\n", "not valid YAML"),
    ("- lr\n", "must hold a mapping"),
    ("params: {lr: [1e-3, 2e-3]}\nfixd: {}\n", "unknown top-level keys ['fixd']"),
    ("fixed: {lr: 1e-3}\n", "'params:' must map at least one setting"),
    ("params: {lr: {low: 3e-3, high: 1e-4}}\n", "empty range"),
    ("params: {lr: {low: 1e-3, high: 1e-3}}\n", "holds one value"),
    ("params: {lr: {choices: []}}\n", "empty choices"),
    ("params: {lr: []}\n", "empty choices"),
    ("params: {lr: {low: 0.0, high: 1e-3, log: true}}\n", "log range must start above 0"),
    ("params: {lr: {low: 1e-4, high: 1e-3, scale: log}}\n", "unknown keys ['scale']"),
    ("params: {lr: {low: 1e-4}}\n", "needs both low: and high:"),
    ("params: {lr: {low: a, high: 1e-3}}\n", "params.lr.low must be a finite number"),
    ("params: {warmup_steps: {low: 0, high: 10, step: 0.5}}\n", "int range needs integer"),
    ("params: {run_name: [a, b]}\n", "set by the sweep"),
    ("fixed: {lr: 1e-3}\nparams: {lr: [1e-3, 2e-3]}\n", "in both fixed: and params:"),
    ("params: {lr: {low: 1e-4, high: 1e-3}}\nfirst: [{lr: 1e-2}]\n", "outside its range"),
    ("params: {lr: {low: 1e-4, high: 1e-3}}\nfirst: [{wd: 0.1}]\n", "not in params"),
])
def test_space_file_mistakes_are_one_line_errors(tmp_path, text, needle):
    with pytest.raises(UserError) as err:
        load_space(space_file(tmp_path, text))
    assert needle in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("params, nproc, needle", [
    ("learning_rate: [1.0e-3, 2.0e-3]", 1, "unknown config keys ['learning_rate']"),
    ("lr: {low: 0.0, high: 1.0e-3}", 1, "lr must be positive"),
    ("model.dropout: {low: 0.0, high: 1.5}", 1, "model.dropout must be in [0, 1)"),
    ("model.dropuot: [0.0, 0.1]", 1, "unknown model keys ['model.dropuot']"),
    ("global_batch_size: [16, 32]", 1, "global_batch_size=16 is outside the tiny range 32-64"),
    ("global_batch_size: [32, 48]", 2, "global_batch_size=48 is not a multiple of micro_batch_size 16 x 2 ranks"),
    ("zero_stage: [1, 4]", 1, "zero_stage must be 0, 1, 2 or 3"),
])
def test_values_the_trainer_would_refuse_are_found_before_any_trial(tmp_path, params, nproc, needle):
    space = load_space(space_file(tmp_path, f"params:\n  {params}\n"))
    with pytest.raises(UserError) as err:
        check_space(space, TINY, nproc, max_steps=10)
    assert needle in str(err.value), err.value
    assert "\n" not in str(err.value)


def test_a_valid_space_passes_the_checks_with_two_ranks(tmp_path):
    space = load_space(ROOT / "sweeps" / "tiny.yaml")
    check_space(space, TINY, 2, max_steps=400)
    check_space(load_space(ROOT / "sweeps" / "small.yaml"), str(ROOT / "ds_configs" / "small.json"), 2, 2000)


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h", 7200), ("1h30m", 5400), ("45s", 45), ("3600", 3600)])
def test_timeout_durations(text, seconds):
    assert sweep_cli.parse_duration(text) == seconds


# ---------------------------------------------------------------------------------------------- storage


def test_a_dead_workers_trial_is_failed_and_requeued_once_a_live_one_is_left_alone(tmp_path):
    storage = open_storage(None, tmp_path, heartbeat_s=1)  # stale after 3 s without a heartbeat
    study = optuna.create_study(study_name="s", storage=storage)
    dead = study.ask()
    dead.suggest_float("lr", 1e-4, 1e-2, log=True)
    storage.record_heartbeat(dead._trial_id)  # one beat, then its worker "dies"
    live = study.ask()
    with heartbeat(study, live):  # Optuna's heartbeat thread, beating every second
        time.sleep(3.5)
        fail_dead_trials(study)
        states = {t.number: t.state.name for t in study.get_trials()}
    assert states == {0: "FAIL", 1: "RUNNING", 2: "WAITING"}
    retry = study.get_trials()[2]
    assert retry.params == dead.params and retry.system_attrs["failed_trial"] == 0
    assert Tally.of(study).claimed == 2  # the failed trial and its retry count once
    study.tell(live, 1.0)

    again = study.ask()  # the queued retry comes first
    assert again.number == 2 and again.params == dead.params
    storage.record_heartbeat(again._trial_id)
    time.sleep(3.5)
    fail_dead_trials(study)
    assert [t.state.name for t in study.get_trials()] == ["FAIL", "COMPLETE", "FAIL"]  # retried once only
    assert Tally.of(study).claimed == 2


def test_an_unreachable_database_is_one_line(tmp_path):
    with pytest.raises(UserError) as err:
        open_storage(f"sqlite:///{tmp_path}/missing/dir/optuna.db", tmp_path, 60)
    assert "cannot be reached" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError) as err:
        open_storage("redis://localhost/0", tmp_path, 60)
    assert "use postgresql://" in str(err.value)


# ---------------------------------------------------------------------------------------------- summary


def finished_study(out: Path) -> optuna.Study:
    """A study of four trials as a sweep leaves it (no trial folders: their figures come from attributes)."""
    study = optuna.create_study(study_name="demo", storage=open_storage(None, out, 60))
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-2, log=True)
    dropout = optuna.distributions.CategoricalDistribution([0.0, 0.1])
    for number, (state, lr_value, drop, value) in enumerate([("COMPLETE", 1e-3, 0.0, 5.2), ("COMPLETE", 3e-3, 0.1, 4.9),
                                                            ("PRUNED", 1e-5, 0.1, 7.5), ("FAIL", 2e-3, 0.0, None)]):
        settings = {"eval_interval": 2, "model.vocab_size": 2000, "lr": lr_value, "model.dropout": drop}
        study.add_trial(optuna.trial.create_trial(
            state=optuna.trial.TrialState[state], value=value, params={"lr": lr_value, "model.dropout": drop},
            distributions={"lr": lr, "model.dropout": dropout},
            intermediate_values={2: (value or 6.0) + 1.0, 4: value or 6.0} if state != "FAIL" else {},
            user_attrs={"settings": settings, "steps": 4 if state != "PRUNED" else 2, "outcome": state.lower(),
                        "note": f"note {number}"}))
    return study


def test_best_yaml_is_accepted_by_the_trainer_and_holds_the_best_settings(tmp_path):
    study = finished_study(tmp_path)
    path = write_best_yaml(study, tmp_path, {"max_steps": 4, "ds_config": "ds_configs/tiny.json", "data": "shards/x"})
    cfg = load_train_config(str(path))
    assert (cfg.optim.lr, cfg.loop.eval_interval, cfg.loop.max_steps) == (3e-3, 2, 4)
    assert cfg.model == {"vocab_size": 2000, "dropout": 0.1}
    assert "trial 1" in path.read_text().splitlines()[0]
    table = format_table(trial_rows(study))
    lines = table.splitlines()
    assert lines[0].split() == ["trial", "outcome", "best", "val", "loss", "steps", "time", "lr", "model.dropout",
                                "note"]
    assert [line.split()[1] for line in lines[2:]] == ["complete", "complete", "pruned", "fail"]


def test_summary_on_demand_writes_table_best_yaml_and_the_page_with_plots(tmp_path):
    finished_study(tmp_path)
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run_tool(lambda: sweep_cli.main(["--summary", str(tmp_path)]))
    assert exit_.value.code == 0, err.getvalue()
    assert "pruned" in out.getvalue() and (tmp_path / "best.yaml").is_file()
    page = (tmp_path / "report.html").read_text()
    assert page.count("<img ") == 4  # history, importances, parallel coordinates, validation curves
    for name in ("history", "importances", "parallel", "curves"):
        assert (tmp_path / "report_files" / f"{name}.png").stat().st_size > 1000
    assert "lr" in page and "note 2" in page


# ---------------------------------------------------------------------------------------------- bad input


def run_sweep_here(*args) -> tuple[int, str]:
    """tools/sweep.py in this process, through run_tool as the script runs it: (exit status, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err), pytest.raises(SystemExit) as exit_:
        run_tool(lambda: sweep_cli.main([str(a) for a in args]))
    return exit_.value.code, err.getvalue()


GOOD_SPACE = ("ds_config: ds_configs/tiny.json\nfixed: {model.vocab_size: 2000}\n"
              "params: {lr: {low: 1.0e-4, high: 1.0e-3}}\n")


@pytest.mark.parametrize("case, needle", [
    ("missing space file", "does not exist"),
    ("malformed YAML", "is not valid YAML"),
    ("unknown key", "unknown config keys ['learnig_rate']"),
    ("empty range", "empty range"),
    ("unreachable storage", "cannot be reached"),
    ("out is a file", "exists and is not a directory"),
    ("python launcher with 2 ranks", "--launcher python runs one process"),
    ("bad timeout", "--timeout 'soon'"),
])
def test_bad_input_is_one_line_and_starts_no_trial(tmp_path, train_shards, case, needle):
    space = space_file(tmp_path, GOOD_SPACE)
    out = tmp_path / "sweep"
    extra: list = []
    if case == "missing space file":
        space = tmp_path / "nope.yaml"
    elif case == "malformed YAML":
        space.write_text("params: {lr: {low: 1e-4, high: 1e-3}\n")
    elif case == "unknown key":
        space.write_text(GOOD_SPACE.replace("lr:", "learnig_rate:"))
    elif case == "empty range":
        space.write_text(GOOD_SPACE.replace("high: 1.0e-3", "high: 1.0e-5"))
    elif case == "unreachable storage":
        extra = ["--storage", f"sqlite:///{tmp_path}/no/such/dir/optuna.db"]
    elif case == "out is a file":
        out.write_text("keep me")
    elif case == "python launcher with 2 ranks":
        extra = ["--nproc", "2", "--launcher", "python"]
    elif case == "bad timeout":
        extra = ["--timeout", "soon"]
    code, err = run_sweep_here("--space", space, "--data", train_shards, "--out", out, "--trials", 1, *extra)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and "Traceback" not in err, err
    assert lines[-1].startswith("error: ") and needle in lines[-1], lines[-1]
    if case == "out is a file":
        assert out.read_text() == "keep me"
    else:
        assert not out.exists()  # nothing written, no trial started


def test_bad_input_through_the_script_exits_2_with_one_line(tmp_path, train_shards):
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "sweep.py"), "--space", str(tmp_path / "x.yaml"),
                             "--data", str(train_shards), "--out", str(tmp_path / "o")], cwd=ROOT, env=cpu_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: --space {tmp_path / 'x.yaml'} does not exist"], result.stderr
    assert not (tmp_path / "o").exists()


def test_a_rerun_with_another_space_is_refused(tmp_path, train_shards):
    storage_dir = tmp_path / "sweep"
    storage_dir.mkdir()
    optuna.create_study(study_name="sweep", storage=open_storage(None, storage_dir, 60)).set_user_attr("plan", "{}")
    code, err = run_sweep_here("--space", space_file(tmp_path, GOOD_SPACE), "--data", train_shards,
                               "--out", storage_dir, "--trials", 1)
    assert code == 2 and "was started with another space" in err.splitlines()[-1], err
    assert sorted(p.name for p in storage_dir.iterdir() if not p.name.startswith(".")) == [JOURNAL_NAME]
