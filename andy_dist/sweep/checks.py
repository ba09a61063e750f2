"""Would the trainer accept these settings? Asked of the trainer's own planning, before any trial starts.

Each check resolves a run exactly as `launch/train.py` does at start-up (`plan_run`: config keys and
values, model shape, precision, and the batch maths for the number of ranks a trial gets), so a
refusal carries the trainer's own message. Nothing is launched and no data is read.
"""

from __future__ import annotations

from andy_dist import UserError
from andy_dist.sweep.space import SearchSpace, override


def _rank_zero_of(nproc: int) -> dict[str, str]:
    """The environment rank 0 of an `nproc`-rank trial sees (what its batch maths depend on)."""
    return {"RANK": "0", "WORLD_SIZE": str(nproc), "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": "29500"}


def refusal(ds_config: str, overrides: list[str], nproc: int, max_steps: int | None) -> str | None:
    """The trainer's one-line reason to refuse this run, or None if it would start."""
    from andy_dist.train.run import build_parser, plan_run

    argv = ["--ds_config", ds_config, *overrides] + (["--max-steps", str(max_steps)] if max_steps else [])
    try:
        plan_run(build_parser().parse_intermixed_args(argv), env=_rank_zero_of(nproc))
    except UserError as err:  # ConfigError is a UserError
        return str(err)
    return None


def check_space(space: SearchSpace, ds_config: str, nproc: int, max_steps: int | None) -> None:
    """Raise a UserError if the trainer would refuse a range end or a choice of any parameter.

    Each end/choice is tried with the fixed settings and the other parameters at their defaults, and
    then all low ends together and all high ends together (settings that limit each other, such as
    global_batch_size and micro_batch_size, meet there).
    """
    fixed = space.fixed_overrides()
    reason = refusal(ds_config, fixed, nproc, max_steps)
    if reason:
        raise UserError(f"{space.path}: the fixed settings are refused: {reason}")
    for param in space.params:
        for value in param.extremes():
            reason = refusal(ds_config, fixed + [override(param.name, value)], nproc, max_steps)
            if reason:
                raise UserError(f"{space.path}: params.{param.name} = {value!r} would be refused with "
                                f"{nproc} rank(s): {reason}")
    for index, point in enumerate(space.first):
        reason = refusal(ds_config, space.overrides(point), nproc, max_steps)
        if reason:
            raise UserError(f"{space.path}: first[{index}] would be refused: {reason}")
    ranges = [p for p in space.params if p.kind != "categorical"]
    for end in ("low", "high"):
        combined = [override(p.name, getattr(p, end)) for p in ranges]
        reason = refusal(ds_config, fixed + combined, nproc, max_steps) if len(combined) > 1 else None
        if reason:
            raise UserError(f"{space.path}: the {end} ends together ({' '.join(combined)}) would be refused: {reason}")
