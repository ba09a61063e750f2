"""tools/sweep.py: search training settings with Optuna, each trial a real training run.

    python tools/sweep.py --space sweeps/tiny.yaml --data shards/NAME --out sweeps/NAME --trials 20 \\
        [--nproc 2 --launcher deepspeed|torchrun|python] [--max-steps 400] [--timeout 2h] \\
        [--storage postgresql://USER:PASSWORD@HOST/DB] [--study NAME] [--sampler tpe|random|grid] \\
        [--pruner median|hyperband|none]
    python tools/sweep.py --summary sweeps/NAME          # table, best.yaml and report.html, on demand

Run the same command again to continue an interrupted study; run it on several machines (same
--storage and --study) to share one study. See README ("Hyper-parameter search").
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from andy_dist import UserError
from andy_dist.cli import atomic_path, check_output_path
from andy_dist.data.remote import is_url

RECORD_NAME = "sweep.json"
STORAGE_ENV = "ANDY_SWEEP_STORAGE"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--space", help="search space YAML (sweeps/tiny.yaml shows the format)")
    p.add_argument("--data", help="shard set written by tools/make_shards.py: a folder or a URL")
    p.add_argument("--out", help="the sweep's folder: trial-NNNN/ runs, the journal, best.yaml, report.html")
    p.add_argument("--trials", type=int, default=20, help="trials in the study, all workers together (default 20)")
    p.add_argument("--nproc", type=int, default=1, help="ranks per trial (default 1)")
    p.add_argument("--launcher", choices=["deepspeed", "torchrun", "python"],
                   help="how each trial starts (default: python for 1 rank, deepspeed for more)")
    p.add_argument("--max-steps", type=int, help="optimizer steps per trial")
    p.add_argument("--timeout", help="start no trial after this long, e.g. 90m, 2h, 3600 (seconds)")
    p.add_argument("--storage", default=os.environ.get(STORAGE_ENV) or None,
                   help=f"postgresql://... or mysql://... for workers on many nodes (default: ${STORAGE_ENV}, which "
                        f"keeps a password off the command line, else a journal file in --out)")
    p.add_argument("--study", help="study name (default: the --out folder's name)")
    p.add_argument("--sampler", choices=["tpe", "random", "grid"], default="tpe")
    p.add_argument("--pruner", choices=["median", "hyperband", "none"], default="median")
    p.add_argument("--pruner-startup", type=int, default=3,
                   help="the median pruner prunes nothing until this many trials have completed (default 3)")
    p.add_argument("--seed", type=int, help="sampler seed (give each worker its own, or they sample alike)")
    p.add_argument("--ds_config", "--ds-config", dest="ds_config", help="DeepSpeed JSON (default: the space file's)")
    p.add_argument("--tokenizer", help="tokenizer.model for the trials (default: the one inside --data)")
    p.add_argument("--heartbeat", type=int, default=60,
                   help="seconds between a worker's heartbeats; a trial silent for 3 of them is failed and retried")
    p.add_argument("--summary", metavar="DIR", help="only print the table and write best.yaml and report.html")
    return p


def parse_duration(text: str) -> float:
    """'90m', '2h', '1h30m', '45s' or plain seconds -> seconds."""
    parts = re.fullmatch(r"\s*(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?\s*", text)
    if not text.strip() or parts is None or not any(parts.groups()):
        raise UserError(f"--timeout {text!r}: write a duration such as 90m, 2h, 1h30m or 3600")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in parts.groups())
    return hours * 3600 + minutes * 60 + seconds


def _required(args, *names: str) -> None:
    missing = [f"--{n}" for n in names if getattr(args, n) is None]
    if missing:
        raise UserError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required "
                        f"(or --summary DIR for the summary of a sweep)")


def build_plan(args):
    """Check every input and resolve the sweep, before anything is written or launched."""
    from andy_dist.sweep.checks import check_space
    from andy_dist.sweep.driver import SweepPlan
    from andy_dist.sweep.launching import check_launcher
    from andy_dist.sweep.space import load_space

    _required(args, "space", "data", "out")
    for name in ("trials", "heartbeat", "pruner_startup"):
        if getattr(args, name) < (0 if name == "pruner_startup" else 1):
            raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    out = check_output_path(args.out, "--out", directory=True)
    space = load_space(args.space)
    launcher = args.launcher or ("python" if args.nproc == 1 else "deepspeed")
    check_launcher(launcher, args.nproc)
    ds_config = args.ds_config or space.ds_config
    if not ds_config:
        raise UserError(f"no DeepSpeed config: add ds_config: ds_configs/NAME.json to {space.path} or pass --ds_config")
    if not is_url(args.data) and not Path(args.data).is_dir():
        raise UserError(f"--data {args.data} is not a folder (or a URL); make shards with tools/make_shards.py")
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise UserError(f"--tokenizer {args.tokenizer} does not exist")
    max_steps = args.max_steps or space.fixed.get("max_steps")
    space = _with_evaluations(space, max_steps)
    check_space(space, ds_config, args.nproc, args.max_steps)
    eval_interval = space.fixed.get("eval_interval")
    pruner = {"name": args.pruner, "startup_trials": args.pruner_startup,
              "min_resource": eval_interval if isinstance(eval_interval, int) else 1, "max_resource": max_steps}
    return SweepPlan(space=space, ds_config=ds_config, data=str(args.data), out=out, trials=args.trials,
                     study=args.study or out.resolve().name, storage_url=args.storage, nproc=args.nproc,
                     launcher=launcher, max_steps=args.max_steps,
                     timeout_s=parse_duration(args.timeout) if args.timeout else None, sampler=args.sampler,
                     pruner=pruner, seed=args.seed, tokenizer=args.tokenizer, heartbeat_s=args.heartbeat)


def _with_evaluations(space, max_steps):
    """Pruning needs evaluations during a trial: without eval_interval, evaluate 10 times per trial."""
    if "eval_interval" in space.fixed or any(p.name == "eval_interval" for p in space.params):
        return space
    if not max_steps:
        print("sweep: no eval_interval and no --max-steps: trials validate at epoch ends only, so pruning "
              "has few chances; set fixed: eval_interval", file=sys.stderr)
        return space
    interval = max(1, int(max_steps) // 10)
    print(f"sweep: no eval_interval in the space file: each trial validates every {interval} steps", flush=True)
    return replace(space, fixed={**space.fixed, "eval_interval": interval})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.summary:
        return summary_only(args)
    plan = build_plan(args)
    from andy_dist.sweep.driver import Worker, open_study
    from andy_dist.sweep.storage import open_storage

    if plan.storage_url:  # a database is reached before --out is created: a wrong URL leaves nothing behind
        storage = open_storage(plan.storage_url, plan.out, plan.heartbeat_s)
    plan.out.mkdir(parents=True, exist_ok=True)
    if not plan.storage_url:
        storage = open_storage(None, plan.out, plan.heartbeat_s)
    study = open_study(plan, storage)
    with atomic_path(plan.out / RECORD_NAME) as tmp:
        tmp.write_text(json.dumps(plan.record(), indent=2) + "\n")
    print(f"sweep: study {plan.study!r}, {len(study.trials)} trial(s) so far, budget {plan.trials}; "
          f"{plan.sampler} sampler, {plan.pruner['name']} pruner; each trial {plan.launcher} x {plan.nproc} "
          f"rank(s){f', {plan.max_steps} steps' if plan.max_steps else ''}", flush=True)
    with _progress_bar(plan, study) as (write, progress):
        code = Worker(plan, study, write=write, progress=progress).run()
    summarize(study, plan.out, plan.record())
    return code


@contextmanager
def _progress_bar(plan, study):
    """(write, progress) for the worker: a tqdm bar of the study's finished trials on a terminal, else plain lines."""
    if not sys.stdout.isatty():
        yield (lambda line: print(line, flush=True)), None
        return
    from tqdm import tqdm

    from andy_dist.sweep.driver import Tally

    bar = tqdm(total=plan.trials, initial=Tally.of(study).finished, unit="trial", desc=f"study {plan.study}")

    def progress(finished: int) -> None:
        bar.n = min(finished, plan.trials)
        bar.refresh()

    try:
        yield bar.write, progress
    finally:
        bar.close()


def summary_only(args) -> int:
    from andy_dist.sweep.storage import JOURNAL_NAME, open_storage

    out = Path(args.summary)
    if not out.is_dir():
        raise UserError(f"--summary {out} is not a folder; give the --out of a sweep")
    record_path = out / RECORD_NAME
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    if record.get("storage") and not args.storage:
        raise UserError(f"the study of {out} lives in {record['storage']}; pass --storage with that URL "
                        f"(its password is not stored)")
    if not args.storage and not (out / JOURNAL_NAME).is_file():
        raise UserError(f"{out} holds no {JOURNAL_NAME}; give the --out of a sweep, or --storage URL --study NAME")
    storage = open_storage(args.storage, out, heartbeat_s=60, with_heartbeat=False)
    study_name = args.study or record.get("study")
    names = [s.study_name for s in storage.get_all_studies()]
    if study_name is None and len(names) == 1:
        study_name = names[0]
    if study_name not in names:
        raise UserError(f"no study {study_name!r} in that storage (it holds {names}); pass --study NAME")
    import optuna

    summarize(optuna.load_study(study_name=study_name, storage=storage), out, record)
    return 0


def summarize(study, out: Path, record: dict) -> None:
    """Print the trials table; write best.yaml and report.html into `out`."""
    from andy_dist.sweep.report_page import render_sweep_page
    from andy_dist.sweep.summary import format_table, trial_rows, write_best_yaml

    rows = trial_rows(study)
    print(format_table(rows), flush=True)
    best = write_best_yaml(study, out, record)
    about = (f"Study {study.study_name}: {len(rows)} trials ({', '.join(sorted({r.outcome for r in rows}))}); "
             f"data {record.get('data')}, {record.get('ds_config')}, {record.get('max_steps') or 'all'} steps, "
             f"{record.get('launcher')} x {record.get('nproc')} rank(s).")
    pngs = render_sweep_page(study, rows, best, out / "report.html", about)
    print(f"best: {best if best else 'none yet (no trial completed)'}; report: {out / 'report.html'} "
          f"({len(pngs)} plots)", flush=True)
