"""`andy-report --wandb-report`: the report object built from real offline W&B runs (not saved: no network)
holds exactly the runs given, one run set per project, filtered by run id; unsynced and W&B-less runs are
refused in one line; without wandb-workspaces the HTML report is still written."""

from __future__ import annotations

import io
import sys

import pytest

from andy_dist import UserError
from andy_dist.report import load_runs

wr = pytest.importorskip("wandb_workspaces.reports.v2")


def log_run(run_dir, project: str = "andy-llm", wandb_mode: str = "offline"):
    """A real run directory: MetricsLogger with offline W&B, three logged steps."""
    from andy_dist.train.metrics import MetricsLogger

    with MetricsLogger(run_dir, {"model": {}}, is_main=True, wandb_mode=wandb_mode, project=project,
                       total_steps=3, console_stream=io.StringIO()) as log:
        for step in (1, 2, 3):
            log.log(step, {"train/loss": 5.0 - step, "train/lr": 1e-3, "train/tokens_seen": 100 * step})
    return run_dir


def mark_synced(run) -> None:
    """What `wandb sync` leaves after uploading an offline run: a .wandb.synced marker beside its .wandb file."""
    from pathlib import Path

    (wandb_file,) = Path(run.wandb["dir"]).glob("*.wandb")
    wandb_file.with_suffix(".wandb.synced").touch()


def report_run_ids(report) -> dict[str, list[str]]:
    """{"entity/project": run ids} the report's run sets are filtered to, read back from their filters."""
    from wandb_workspaces import expr

    found: dict[str, list[str]] = {}
    for block in report.blocks:
        for runset in getattr(block, "runsets", None) or []:
            condition = expr.expr_to_filters(runset.filters)
            assert (condition.key.section, condition.key.name, condition.op) == ("run", "name", "IN"), runset.filters
            found.setdefault(f"{runset.entity}/{runset.project}", []).extend(condition.value)
    return found


@pytest.fixture(scope="module")
def offline_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("wandb_runs")
    return [log_run(base / "a"), log_run(base / "b"), log_run(base / "c", project="andy-llm-other")]


def test_unsynced_offline_runs_are_refused_with_the_sync_command(offline_runs):
    from andy_dist.wandb_report import build_report

    runs = load_runs(offline_runs[:2])
    with pytest.raises(UserError, match="never synced.*wandb sync .*offline-run-.* .*offline-run-") as err:
        build_report(runs, "t", entity="me")
    assert "\n" not in str(err.value)


def test_the_report_holds_exactly_the_runs_given_grouped_by_project(offline_runs):
    from andy_dist.wandb_report import build_report

    runs = load_runs(offline_runs)
    for run in runs:
        mark_synced(run)
    ids = [run.wandb["id"] for run in runs]
    assert len(set(ids)) == 3
    report = build_report(runs, "Andy-LLM: a, b, c", entity="me")
    assert report_run_ids(report) == {"me/andy-llm": ids[:2], "me/andy-llm-other": ids[2:]}
    assert (report.entity, report.project, report.title) == ("me", "andy-llm", "Andy-LLM: a, b, c")
    only_two = build_report(runs[:2], "two", entity="me")
    assert report_run_ids(only_two) == {"me/andy-llm": ids[:2]}


def test_a_run_without_wandb_is_refused(offline_runs, tmp_path):
    from andy_dist.wandb_report import build_report

    runs = load_runs([offline_runs[0], log_run(tmp_path / "quiet", wandb_mode="disabled")])
    with pytest.raises(UserError, match="quiet logged no W&B run"):
        build_report(runs, "t", entity="me")


def test_without_wandb_workspaces_the_html_is_written_and_one_line_says_what_to_install(offline_runs, tmp_path,
                                                                                        monkeypatch):
    from andy_dist.commands.report import main

    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # as if not installed: importing it fails
    monkeypatch.setitem(sys.modules, "wandb_workspaces.reports.v2", None)
    out = tmp_path / "r.html"
    with pytest.raises(UserError, match="^--wandb-report needs the wandb-workspaces package: pip install"):
        main([str(offline_runs[0]), "-o", str(out), "--wandb-report"])
    assert out.is_file() and out.stat().st_size > 1000
