"""Turn run directories (metrics.jsonl, samples.jsonl, config.json) into one HTML page with plots.

Only local files are read, so a report can be made after an offline run, on a cluster with no
network. Several runs are overlaid in every plot, one colour each. The page is self-contained
(each PNG embedded as a base64 data URI); the same PNGs are also written beside it, in
`NAME_files/`, for slides or a README.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from andy_dist import UserError
from andy_dist.cli import atomic_path
from andy_dist.train.metrics import METRIC_KEYS

SAMPLE_STEPS_SHOWN = 3  # the most recent sampling rounds per run in the samples table


# ---------------------------------------------------------------- reading a run


@dataclass
class Run:
    """One run directory, read back."""

    path: Path
    label: str
    records: list[dict]
    samples: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    wandb: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of a numeric key, sorted by step; for a step logged twice (a run
        resumed from an earlier checkpoint re-logs it) the later value wins."""
        by_step: dict[int, float] = {}
        for record in self.records:
            value = _number(record.get(key))
            if value is not None:
                by_step[record["step"]] = value
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def tokens_at(self, steps: list[int]) -> list[float]:
        """Tokens seen at each step, interpolated from train/tokens_seen (val steps need it too)."""
        import numpy as np

        known_steps, tokens = self.series("train/tokens_seen")
        if not known_steps:
            return []
        return list(np.interp(steps, known_steps, tokens))

    def last(self, key: str) -> Optional[float]:
        values = self.series(key)[1]
        return values[-1] if values else None


def _number(value) -> Optional[float]:
    """A plottable float from a JSONL value: numbers, and "nan"/"inf" as written for non-finite
    floats (they leave a gap); None for "n/a", text and missing values."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if value in ("nan", "inf", "-inf"):
        return float(value)
    return None


def _read_jsonl(path: Path, warnings: list[str]) -> list[dict]:
    """Objects of a JSONL file. A broken last line (a run killed mid-write) is skipped with a
    warning; a broken line elsewhere means the file is not ours, and is an error."""
    try:
        lines = path.read_bytes().decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (byte {err.start}); is this a file written by MetricsLogger?") \
            from None
    out = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):
                warnings.append(f"{path.name}: skipped an incomplete last line")
                continue
            raise UserError(f"{path}: line {number} is not JSON; is this a metrics file written by MetricsLogger?")
        if not isinstance(obj, dict) or not isinstance(obj.get("step"), int):
            raise UserError(f"{path}: line {number} has no integer 'step'; is this a file written by MetricsLogger?")
        out.append(obj)
    return out


def load_run(path, label: Optional[str] = None) -> Run:
    """Read a run directory; a UserError names what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory")
    metrics = path / "metrics.jsonl"
    if not metrics.is_file():
        raise UserError(f"{path}: no metrics.jsonl here; a run directory is the one a training run writes (runs/NAME)")
    warnings: list[str] = []
    records = _read_jsonl(metrics, warnings)
    if not records:
        raise UserError(f"{metrics}: no metrics logged yet")
    samples = _read_jsonl(path / "samples.jsonl", warnings) if (path / "samples.jsonl").is_file() else []
    config, wandb = {}, {}
    for name in ("config.json", "wandb.json"):
        if (path / name).is_file():
            try:
                data = json.loads((path / name).read_bytes().decode("utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                raise UserError(f"{path / name}: not JSON ({err})") from None
            if name == "config.json":
                config = data
            else:
                wandb = data
    return Run(path, label or path.name, records, samples, config, wandb, warnings)


def load_runs(paths) -> list[Run]:
    """Several runs; labels are the directory names, or longer paths where names repeat."""
    paths = [Path(p) for p in paths]
    if not paths:
        raise UserError("name at least one run directory")
    names = [p.name for p in paths]
    return [load_run(p, p.name if names.count(p.name) == 1 else str(p)) for p in paths]


# ---------------------------------------------------------------- plots


@dataclass(frozen=True)
class Plot:
    """One figure: keys drawn against steps or tokens; val and sample keys as points, train keys as lines.
    `right` keys go on a second y axis (labelled `rlabel`), for two quantities in different units."""

    name: str
    title: str
    keys: tuple[str, ...]
    ylabel: str
    x: str = "step"  # or "tokens"
    logy: bool = False
    percent: bool = False
    optional: bool = False  # left out when no run logged any of its keys
    right: tuple[str, ...] = ()
    rlabel: str = ""


PLOTS = (
    Plot("loss_vs_step", "Loss against steps", ("train/loss", "val/loss"), "loss (nats/token)"),
    Plot("loss_vs_tokens", "Loss against tokens seen", ("train/loss", "val/loss"), "loss (nats/token)", x="tokens"),
    # Sample quality beside validation loss: the same steps, the model's own text against held-out text.
    Plot("samples_vs_val", "Validation loss and sample log-prob", ("val/loss",), "validation loss (nats/token)",
         optional=True, right=("samples/logprob",), rlabel="sample mean log-prob (nats/token)"),
    Plot("sample_text", "Sample text: distinct n-grams, repeated 3-grams, EOS reached",
         ("samples/distinct_1", "samples/distinct_2", "samples/repeat_3gram", "samples/eos_fraction"), "fraction",
         optional=True),
    Plot("sample_length", "Sample length", ("samples/length",), "generated tokens", optional=True),
    Plot("lr", "Learning rate", ("train/lr",), "learning rate"),
    Plot("grad_norm", "Gradient norm", ("train/grad_norm",), "gradient norm", logy=True),
    Plot("tokens_per_s", "Throughput: wall clock and inside the steps",
         ("train/tokens_per_s", "train/tokens_per_s_compute"), "tokens/s (all ranks)"),
    Plot("data_wait", "Share of time waiting for data", ("train/data_wait_fraction",), "fraction of wall clock",
         percent=True, optional=True),
    Plot("mfu", "Model FLOPs utilization", ("train/mfu", "train/mfu_compute"), "MFU", percent=True, optional=True),
    Plot("val_bpb", "Validation bits per byte", ("val/bpb",), "bits per byte", optional=True),
    Plot("memory", "Memory in use", ("sys/memory_gb",), "GB", optional=True),
)


MARKERS = "osD^v"  # a plot's keys told apart when the colours tell the runs apart
LINES = ("-", "-.", ":")


def _smooth(values: list[float], weight: float) -> list[float]:
    """Exponential moving average with bias correction (as TensorBoard's smoothing slider)."""
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        if math.isfinite(v):
            avg = weight * avg + (1 - weight) * v
            norm = weight * norm + (1 - weight)
        out.append(avg / norm if norm else v)
    return out


def draw(plot: Plot, runs: list[Run], png: Path) -> bool:
    """Draw one plot to `png`; False (and no file) when no run has data for it."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    fig, ax = plt.subplots(figsize=(7.2, 4.0), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    right = ax.twinx() if plot.right else None
    drawn = False
    for i, run in enumerate(runs):
        for k, key in enumerate(plot.keys + plot.right):
            colour = colours[(i if len(runs) > 1 else k) % len(colours)]  # per run; with one run, per key
            drawn |= _draw_series(right if key in plot.right else ax, plot, run, key, k, colour)
    if not drawn:
        plt.close(fig)
        return False
    ax.set_title(plot.title)
    ax.set_xlabel("tokens seen" if plot.x == "tokens" else "step")
    ax.set_ylabel(plot.ylabel)
    if right is not None:
        right.set_ylabel(plot.rlabel)
    if plot.logy:
        ax.set_yscale("log")
    if plot.percent:
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{100 * v:.0f}%"))
    if plot.x == "tokens":
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: _si(v)))
    ax.grid(True, alpha=0.3)
    legends = [axes.get_legend_handles_labels() for axes in (ax, right) if axes is not None]
    ax.legend([h for hs, _ in legends for h in hs], [n for _, ns in legends for n in ns], fontsize=8, frameon=False)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def _draw_series(axes, plot: Plot, run: Run, key: str, k: int, colour: str) -> bool:
    """One key of one run (the plot's k-th key); False when the run did not log it."""
    steps, values = run.series(key)
    xs = (run.tokens_at(steps) if plot.x == "tokens" else steps) if steps else []
    if not xs:
        return False
    name = _series_name(run.label, key, plot)
    if key.startswith(("val/", "samples/")):  # logged at evaluations and sampling rounds only: points
        style = MARKERS[k % len(MARKERS)] + (":" if key in plot.right else "--")
        axes.plot(xs, values, style, color=colour, markersize=4, linewidth=1.2, label=name)
    elif key == "train/loss" and len(values) > 20:
        # raw curve faint, smoothed curve bold: noise stays visible without hiding the trend
        axes.plot(xs, values, color=colour, alpha=0.25, linewidth=0.8)
        axes.plot(xs, _smooth(values, 0.9), color=colour, linewidth=1.6, label=f"{name} (smoothed)")
    else:
        axes.plot(xs, values, LINES[k % len(LINES)], color=colour, linewidth=1.4, label=name)
    return True


def _series_name(label: str, key: str, plot: Plot) -> str:
    """A legend entry: the run, and which key when the plot has several (by its group, train/val, when the
    keys' groups differ, else by its name)."""
    keys = plot.keys + plot.right
    if len(keys) == 1:
        return label
    group, _, name = key.partition("/")
    return f"{label} {group if len({k.partition('/')[0] for k in keys}) > 1 else name}"


def _si(value: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{unit}"
    return f"{value:.3g}"


# ---------------------------------------------------------------- figures and tables


def final_figures(run: Run) -> dict[str, str]:
    """The headline numbers of one run, formatted."""
    import statistics

    def fmt(value, spec="{:.4f}"):
        return "n/a" if value is None else spec.format(value)

    tail = [v for v in run.series("train/loss")[1][-10:] if math.isfinite(v)]
    speeds = run.series("train/tokens_per_s")[1]
    mfus = run.series("train/mfu")[1]
    memory = run.series("sys/memory_gb")[1]
    best = min(run.series("val/loss")[1], default=None)
    elapsed = run.last("time/elapsed_s")
    bad, patience = run.last("val/bad_evals"), run.last("val/patience")
    return {
        "steps": str(max(r["step"] for r in run.records)),
        "tokens seen": fmt(run.last("train/tokens_seen"), "{:,.0f}"),
        "train loss (mean of last 10 logs)": fmt(statistics.fmean(tail) if tail else None),
        "best val loss": fmt(best),
        "last val perplexity": fmt(run.last("val/ppl"), "{:.2f}"),
        "last val bits/byte": fmt(run.last("val/bpb")),
        "early stopping": "n/a" if bad is None else f"{bad:.0f} of {patience:.0f} evaluations without improvement"
        if patience is not None else f"{bad:.0f} evaluations without improvement",
        "median tokens/s": fmt(statistics.median(speeds) if speeds else None, "{:,.0f}"),
        "median MFU": fmt(statistics.median(mfus) if mfus else None, "{:.1%}"),
        "peak memory (GB)": fmt(max(memory) if memory else None, "{:.2f}"),
        "elapsed": "n/a" if elapsed is None else _hms(elapsed),
        "W&B run": run.wandb.get("id", "n/a") + (f" ({run.wandb['mode']})" if run.wandb.get("mode") else ""),
    }


def _hms(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"model": {"d_model": 128}} -> {"model.d_model": "128"}."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.dumps(value) if not isinstance(value, str) else value
    return out


def html_table(header: list[str], rows: list[list[str]], row_classes: Optional[list[str]] = None) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def samples_table(run: Run) -> str:
    """The last few sampling rounds of a run, newest first, with the sampler settings and each sample's quality
    figures (andy_dist.train.sample_quality)."""
    if not run.samples:
        return "<p class=muted>No samples logged.</p>"
    steps = sorted({s["step"] for s in run.samples}, reverse=True)[:SAMPLE_STEPS_SHOWN]
    rows = [s for step in steps for s in run.samples if s["step"] == step]
    settings = sorted({k for s in rows for k in s} - {"step", "prompt", "completion"})
    header = ["step", "prompt", "completion", *settings]
    cells = [[s["step"], s.get("prompt", ""), s.get("completion", ""), *(_cell(s.get(k, "")) for k in settings)]
             for s in rows]
    return html_table(header, cells)


def _cell(value) -> str:
    """A table cell: floats (the sample quality figures) to 3 significant digits."""
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def config_table(runs: list[Run]) -> str:
    """Every config key, one column per run; keys whose values differ between runs are marked."""
    flat = [flatten(run.config) for run in runs]
    keys = sorted(set().union(*flat))
    if not keys:
        return "<p class=muted>No config.json found.</p>"
    rows = [[key, *(f.get(key, "—") for f in flat)] for key in keys]
    classes = ["diff" if len(runs) > 1 and len({f.get(key) for f in flat}) > 1 else "" for key in keys]
    return html_table(["key", *(run.label for run in runs)], rows, classes)


# ---------------------------------------------------------------- the page

CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.muted { color: #777; } .warn { color: #a60; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(620px, 1fr)); gap: 1em; }
figure { margin: 0; } figure img { width: 100%; border: 1px solid #eee; }
figcaption { font-size: 12px; color: #777; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td { white-space: pre-wrap; max-width: 60em; } th { background: #f5f5f5; }
tr.diff td { background: #fff6d5; }
"""


def figure_html(png: Path, title: str) -> str:
    """A PNG embedded in the page (base64), captioned with a link to the file beside the page."""
    data = base64.b64encode(png.read_bytes()).decode("ascii")
    rel = f"{png.parent.name}/{png.name}"
    return (f'<figure><img alt="{html.escape(title)}" src="data:image/png;base64,{data}" data-file="{rel}">'
            f'<figcaption>{html.escape(title)} · <a href="{rel}">{rel}</a></figcaption></figure>')


def render(runs: list[Run], out_html, title: Optional[str] = None) -> list[Path]:
    """Write the report page and its PNGs; return the PNG paths (in page order)."""
    out_html = Path(out_html)
    files_dir = out_html.parent / f"{out_html.stem}_files"
    figures, pngs = [], []
    for plot in PLOTS:
        png = files_dir / f"{plot.name}.png"
        if not draw(plot, runs, png):
            if not plot.optional:
                figures.append(f'<figure><p class=muted>{html.escape(plot.title)}: not logged.</p></figure>')
            continue
        pngs.append(png)
        figures.append(figure_html(png, plot.title))
    names = [run.label for run in runs]
    figure_rows = list(final_figures(runs[0]))
    finals = html_table(["", *names], [[row, *(final_figures(run)[row] for run in runs)] for row in figure_rows])
    warnings = "".join(f"<p class=warn>{html.escape(run.label)}: {html.escape(w)}</p>"
                       for run in runs for w in run.warnings)
    samples = "".join(f"<h3>{html.escape(run.label)}</h3>{samples_table(run)}" for run in runs)
    title = title or "Andy-LLM training report: " + ", ".join(names)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class=muted>Runs: {html.escape(", ".join(str(run.path) for run in runs))}. Made from metrics.jsonl,
samples.jsonl and config.json only.</p>
{warnings}
<h2>Final figures</h2>
{finals}
<h2>Plots</h2>
<div class=grid>{''.join(figures)}</div>
<h2>Samples</h2>
{samples}
<h2>Configuration</h2>
{config_table(runs)}
<p class=muted>Metric keys: {html.escape("; ".join(f"{k} = {v}" for k, v in METRIC_KEYS.items()))}.</p>
</body></html>
"""
    with atomic_path(out_html) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return pngs
