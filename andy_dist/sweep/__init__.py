"""Hyper-parameter search over real training runs, with Optuna.

    python tools/sweep.py --space sweeps/tiny.yaml --data shards/NAME --out sweeps/NAME --trials 20

The modules, in the order a sweep uses them:
    space        the search space file (ranges, choices, fixed settings), read and checked on its own
    checks       every range end and choice put through the trainer's own config and batch checks
    storage      where the study lives: a journal file in --out (one machine) or a database (many)
    launching    one trial = one `launch/train.py` run under deepspeed, torchrun or python
    trial_hook   inside a trial's rank 0: report each validation loss, ask whether to prune
    driver       the worker loop: claim a trial, run it, tell the study how it ended
    summary      the table of trials and best.yaml; report the HTML page with Optuna's plots
    cli          the command line (tools/sweep.py)

The trainer knows nothing of Optuna: it takes an optional evaluation callback (`Trainer(on_evaluation=)`),
which `trial_hook` supplies when the run is a trial of a sweep.
"""
