"""The sweep's HTML page: the trials table, best.yaml, and Optuna's matplotlib plots of the study.

Plots: the optimisation history, parameter importances (Optuna's default PED-ANOVA evaluator, which
needs no scikit-learn), parallel coordinates, and the validation loss of every trial at each
evaluation (the values the pruner saw; a pruned trial's curve ends where it stopped). A plot that
the study cannot have yet (importances need two complete trials) is replaced by a line saying why.
The page is self-contained like the training report (andy_dist/report.py), whose table and figure
helpers it uses; the PNGs are also written beside it, in report_files/.
"""

from __future__ import annotations

import html
import warnings
from pathlib import Path

from andy_dist.cli import atomic_path
from andy_dist.report import CSS, figure_html, html_table
from andy_dist.sweep.summary import TrialRow, table_cells


def _plots(study, complete: int, reported: int) -> list[tuple[str, str, object, str | None]]:
    """(file name, title, plot function, reason it cannot be drawn or None)."""
    from optuna.visualization import matplotlib as vis

    none_complete = "no trial has completed yet" if complete == 0 else None
    return [
        ("history", "Optimisation history (best validation loss of each complete trial)",
         vis.plot_optimization_history, none_complete),
        ("importances", "Parameter importances", vis.plot_param_importances,
         "needs two complete trials" if complete < 2 else None),
        ("parallel", "Parallel coordinates of the complete trials", vis.plot_parallel_coordinate, none_complete),
        ("curves", "Validation loss of each trial at each evaluation", vis.plot_intermediate_values,
         "no trial has reported a validation loss yet" if reported == 0 else None),
    ]


def draw_plots(study, files_dir: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """Draw what the study allows into files_dir; ([(png, title)], [notes on the plots left out])."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    trials = study.get_trials(deepcopy=False)
    complete = sum(t.state.name == "COMPLETE" for t in trials)
    reported = sum(bool(t.intermediate_values) for t in trials)
    drawn, notes = [], []
    for name, title, plot, reason in _plots(study, complete, reported):
        if reason:
            notes.append(f"{title}: not drawn, {reason}.")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
                axes = plot(study)
        except Exception as err:  # a plot Optuna cannot draw for this study must not cost the summary
            notes.append(f"{title}: not drawn ({' '.join(str(err).split())[:200]}).")
            plt.close("all")
            continue
        if name in ("history", "curves"):  # Optuna says "Objective Value" / "Intermediate Value"
            axes.set_ylabel("validation loss")
        figure = getattr(axes, "figure", None) or axes.flat[0].figure
        figure.set_size_inches(7.2, 4.2)
        figure.tight_layout()
        png = files_dir / f"{name}.png"
        with atomic_path(png) as tmp:
            figure.savefig(tmp, format="png", dpi=110)
        plt.close(figure)
        drawn.append((png, title))
    return drawn, notes


def render_sweep_page(study, rows: list[TrialRow], best_yaml: Path | None, out_html: Path, about: str) -> list[Path]:
    """Write the page and its PNGs; return the PNG paths."""
    out_html = Path(out_html)
    drawn, notes = draw_plots(study, out_html.parent / f"{out_html.stem}_files")
    header, cells = table_cells(rows)
    classes = ["diff" if row.state == "COMPLETE" and best_yaml and row.number == study.best_trial.number else ""
               for row in rows]
    best = (f"<pre>{html.escape(best_yaml.read_text(encoding='utf-8'))}</pre>" if best_yaml
            else "<p class=muted>No trial has completed yet, so there is no best.yaml.</p>")
    figures = "".join(figure_html(png, title) for png, title in drawn)
    title = f"Hyper-parameter search: {study.study_name}"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class=muted>{html.escape(about)}</p>
<h2>Trials</h2>
{html_table(header, cells, classes)}
<h2>Best trial: best.yaml</h2>
{best}
<h2>Plots</h2>
<div class=grid>{figures}</div>
{''.join(f"<p class=muted>{html.escape(note)}</p>" for note in notes)}
</body></html>
"""
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return [png for png, _ in drawn]
