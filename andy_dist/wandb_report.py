"""A W&B report of exactly the runs named (`andy-report RUN... --wandb-report`).

The report holds one panel grid per W&B project among the runs, each with a run set filtered to those runs'
ids, so it shows the runs given and no other run of the project. A run logged offline exists on W&B only
once `wandb sync` has uploaded it (which leaves a `.wandb.synced` marker beside the run's .wandb file), so an
unsynced run is refused with the command that syncs it, and a run without W&B (disabled) is refused too.
Offline runs do not know their entity: it is `entity` when given, else the account's default entity, the one
`wandb sync` uploads to. Needs the `wandb-workspaces` package (extra `wandb-report`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

from andy_dist import UserError

if TYPE_CHECKING:
    from andy_dist.report import Run


def _unsynced(run: "Run") -> Optional[str]:
    """The offline-run folder to sync, if `run` was logged offline and never synced; else None."""
    if run.wandb.get("mode") != "offline":
        return None
    folder = Path(run.wandb.get("dir") or run.path / "wandb")
    return None if any(folder.glob("*.wandb.synced")) else str(folder)


def _check_runs(runs: list["Run"]) -> None:
    without = [str(run.path) for run in runs if not run.wandb.get("id")]
    if without:
        raise UserError(f"--wandb-report: {', '.join(without)} logged no W&B run (W&B was disabled); leave "
                        f"{'it' if len(without) == 1 else 'them'} out of the report")
    unsynced = [folder for folder in map(_unsynced, runs) if folder]
    if unsynced:
        raise UserError(f"--wandb-report: {len(unsynced)} run(s) were logged offline and never synced; "
                        f"upload them first: wandb sync {' '.join(unsynced)}")


def _default_entity() -> str:
    import wandb

    try:
        entity = wandb.Api().default_entity
    except Exception as err:  # noqa: BLE001 - no login, no network: all end the same way
        raise UserError(f"--wandb-report: cannot ask W&B for your entity ({str(err).splitlines()[0]}); "
                        f"log in (wandb login) or pass --wandb-entity") from None
    if not entity:
        raise UserError("--wandb-report: W&B has no default entity for this login; pass --wandb-entity")
    return entity


def build_report(runs: list["Run"], title: str, entity: Optional[str] = None):
    """The report object (not saved): one panel grid per (entity, project), its run set filtered to the runs."""
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError:
        raise UserError("--wandb-report needs the wandb-workspaces package: pip install wandb-workspaces") from None
    from andy_dist.report import PLOTS

    _check_runs(runs)
    groups: dict[tuple[str, str], list["Run"]] = {}
    for run in runs:
        run_entity = run.wandb.get("entity") or entity or _default_entity()
        groups.setdefault((run_entity, run.wandb.get("project") or "andy-llm"), []).append(run)
    panels = [wr.LinePlot(x="step", y=list(plot.keys), title=plot.title) for plot in PLOTS if plot.x == "step"]
    blocks = [wr.H1(title)]
    for (group_entity, project), members in groups.items():
        ids = [run.wandb["id"] for run in members]
        runset = wr.Runset(entity=group_entity, project=project, filters=expr.And(expr.Metric("ID").isin(ids)),
                           name=f"{project}: {', '.join(r.label for r in members)}")
        blocks += [wr.H2(f"{group_entity}/{project}"), wr.PanelGrid(runsets=[runset], panels=panels)]
    (first_entity, first_project) = next(iter(groups))
    return wr.Report(project=first_project, entity=first_entity, title=title, blocks=blocks,
                     description="Runs: " + ", ".join(f"{run.label} ({run.wandb['id']})" for run in runs))


def wandb_report(runs: list["Run"], title: str, entity: Optional[str] = None) -> str:
    """Create the report on W&B (needs a login and the network); return its URL."""
    report = build_report(runs, title, entity)
    try:
        report.save()
    except Exception as err:  # noqa: BLE001 - the HTML report is already written; say why W&B refused
        raise UserError(f"--wandb-report: W&B did not save the report ({str(err).splitlines()[0]})") from None
    return report.url
