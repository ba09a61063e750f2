#!/usr/bin/env python
"""Make one self-contained HTML report (plots embedded as PNG) from one or more run directories.

    python tools/report.py runs/NAME [runs/OTHER ...] -o report.html [--wandb-report]

Reads only RUN/metrics.jsonl, RUN/samples.jsonl and RUN/config.json, so it works after an
offline run and on a machine with no network. The PNGs are also written to report_files/.
Several runs are overlaid for comparison. --wandb-report also creates a W&B report (online only).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    from andy_dist import report

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run directories (runs/NAME)")
    parser.add_argument("-o", "--output", default="report.html", help="HTML file to write (default report.html)")
    parser.add_argument("--title", help="page title (default: the run names)")
    parser.add_argument("--wandb-report", action="store_true", help="also create a W&B report (needs a login)")
    args = parser.parse_args()

    from andy_dist.cli import check_output_path

    check_output_path(args.output, "-o")
    runs = report.load_runs(args.runs)
    pngs = report.render(runs, args.output, title=args.title)
    print(f"wrote {args.output} ({len(pngs)} plots, also in {Path(args.output).stem}_files/)")
    if args.wandb_report:
        url = report.wandb_report(runs, args.title or "Andy-LLM: " + ", ".join(run.label for run in runs))
        print(f"W&B report: {url}")
    return 0


if __name__ == "__main__":
    from andy_dist.cli import run_tool

    run_tool(main)
