"""Make one self-contained HTML report (plots embedded as PNG) from one or more run directories.

    andy-report runs/NAME [runs/OTHER ...] -o report.html [--wandb-report]      (or: python tools/report.py ...)

Reads only RUN/metrics.jsonl, RUN/samples.jsonl and RUN/config.json, so it works after an
offline run and on a machine with no network. The PNGs are also written to report_files/.
Several runs are overlaid for comparison. --wandb-report also creates a W&B report of exactly these
runs (online; offline runs must have been synced with `wandb sync` first).
"""

import argparse
from pathlib import Path

from andy_dist.cli import run_tool


def main(argv=None) -> int:
    from andy_dist import report
    from andy_dist.cli import check_output_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    parser.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    parser.add_argument("--title", help="page title (default: the run names)")
    parser.add_argument("--wandb-report", action="store_true", help="also create a W&B report (needs a login)")
    parser.add_argument("--wandb-entity", help="W&B entity of runs that were logged offline (default: your default "
                                               "entity, which `wandb sync` also uses)")
    args = parser.parse_args(argv)

    check_output_path(args.output, "-o")
    runs = report.load_runs(args.runs)
    pngs = report.render(runs, args.output, title=args.title)
    print(f"wrote {args.output} ({len(pngs)} plots, also in {Path(args.output).stem}_files/)")
    if args.wandb_report:
        from andy_dist.wandb_report import wandb_report

        url = wandb_report(runs, args.title or "Andy-LLM: " + ", ".join(run.label for run in runs),
                                  entity=args.wandb_entity)
        print(f"W&B report: {url}")
    return 0


def run() -> None:
    run_tool(main)
