"""What a study found: a table of its trials, `best.yaml`, and the HTML page (`report_page`).

best.yaml holds the best complete trial's settings (the fixed ones and the sampled ones, model.* keys
nested under `model:`) and its max_steps, so `launch/train.py --config best.yaml` with the same
--ds_config and --data trains that trial again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from andy_dist import UserError
from andy_dist.cli import atomic_path

BEST_NAME = "best.yaml"


def read_trial_metrics(trial_dir: Path) -> tuple[int | None, float | None]:
    """(last step logged, best validation loss) of a trial's metrics.jsonl; None for what is missing."""
    from andy_dist.report import load_run

    try:
        run = load_run(trial_dir)
    except UserError:  # the trial died before logging, or never started
        return None, None
    losses = [v for v in run.series("val/loss")[1] if math.isfinite(v)]
    return max(r["step"] for r in run.records), (min(losses) if losses else None)


@dataclass
class TrialRow:
    number: int
    state: str  # Optuna's: COMPLETE, PRUNED, FAIL, RUNNING, WAITING
    outcome: str  # ours: complete, pruned, crashed, diverged, refused, interrupted, running, waiting
    params: dict
    best_val_loss: float | None
    steps: int | None
    seconds: float | None
    note: str
    dir: str | None


def trial_rows(study) -> list[TrialRow]:
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        waiting = trial.state.name == "WAITING"  # a queued retry carries its original's attributes: no figures yet
        steps, best = read_trial_metrics(Path(attrs["dir"])) if attrs.get("dir") and not waiting else (None, None)
        outcome = trial.state.name.lower() if trial.state.name in ("WAITING", "RUNNING", "COMPLETE") \
            else attrs.get("outcome", trial.state.name.lower())
        end = trial.datetime_complete or (datetime.now() if trial.state.name == "RUNNING" else None)
        seconds = (end - trial.datetime_start).total_seconds() if end and trial.datetime_start else None
        rows.append(TrialRow(trial.number, trial.state.name, outcome, dict(trial.params), best,
                             None if waiting else steps if steps is not None else attrs.get("steps"), seconds,
                             _retry_note(trial) if waiting else attrs.get("note", ""), attrs.get("dir")))
    return rows


def _retry_note(trial) -> str:
    original = trial.system_attrs.get("failed_trial")
    return f"retry of trial {original}" if original is not None else "queued"


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def table_cells(rows: list[TrialRow]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the trials table (the console and the HTML page show the same)."""
    names = sorted({name for row in rows for name in row.params})
    header = ["trial", "outcome", "best val loss", "steps", "time", *names, "note"]
    cells = [[str(r.number), r.outcome, _fmt(r.best_val_loss), _fmt(r.steps), _duration(r.seconds),
              *(_fmt(r.params.get(n)) for n in names), r.note[:90]] for r in rows]
    return header, cells


def format_table(rows: list[TrialRow]) -> str:
    header, cells = table_cells(rows)
    widths = [max(len(line[i]) for line in [header, *cells]) for i in range(len(header))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in [header, *cells]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def best_settings(study, max_steps: int | None) -> tuple[object, dict] | None:
    """(best complete trial, its settings as a launch/train.py --config mapping), or None without one."""
    if not any(t.state.name == "COMPLETE" for t in study.get_trials(deepcopy=False)):
        return None
    best = study.best_trial
    mapping: dict = {}
    for key, value in best.user_attrs.get("settings", best.params).items():
        if key.startswith("model."):
            mapping.setdefault("model", {})[key[len("model."):]] = value
        else:
            mapping[key] = value
    if max_steps and "max_steps" not in mapping:
        mapping["max_steps"] = max_steps
    return best, mapping


def write_best_yaml(study, out: Path, record: dict) -> Path | None:
    """out/best.yaml from the best complete trial; None (and no file) when no trial completed."""
    import yaml

    found = best_settings(study, record.get("max_steps"))
    if found is None:
        return None
    best, mapping = found
    header = (f"# Best trial of study {study.study_name}: trial {best.number}, best validation loss {best.value:.6g}"
              f" ({best.user_attrs.get('dir', '')}).\n"
              f"# Train with it:  python launch/train.py --config {out / BEST_NAME} --ds_config "
              f"{record.get('ds_config')} --data {record.get('data')} --out runs/NAME\n")
    path = out / BEST_NAME
    with atomic_path(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(mapping, sort_keys=False), encoding="utf-8")
    return path
