"""The search space file: which training settings a sweep varies, over what, and what it holds fixed.

    # sweeps/tiny.yaml
    ds_config: ds_configs/tiny.json        # the trials' DeepSpeed JSON (--ds_config overrides it)
    fixed:                                 # key=value settings of every trial
      eval_interval: 50
    params:
      lr: {low: 1.0e-4, high: 3.0e-3, log: true}     # float range, log-uniform
      weight_decay: {low: 0.0, high: 0.1}            # float range, uniform
      warmup_steps: {low: 20, high: 100, step: 20}   # int range: both ends written as integers
      model.dropout: {choices: [0.0, 0.1]}           # categorical
      global_batch_size: {choices: [32, 64]}
    first:                                 # optional: tried before any sampling (e.g. settings known to work)
      - {lr: 3.0e-4, weight_decay: 0.01}   # parameters left out are sampled

Keys are the flat `key=value` names of launch/train.py (`lr`, `model.dropout`, ...). A range is an int
range when both ends are integers, else a float range; `type: float` or `type: int` says it outright.
This module checks the file's own shape (kinds, empty ranges); whether the trainer accepts the values
is checked by `andy_dist.sweep.checks` against the real config.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from andy_dist import UserError
from andy_dist.cli import read_text_file

SPACE_KEYS = ("ds_config", "fixed", "params", "first")
RANGE_KEYS = {"low", "high", "log", "step", "type"}
# Settings the sweep gives every trial itself (the trial's name and its W&B group).
RESERVED = ("run_name", "wandb_group")
Value = Any  # a YAML scalar: number, string, boolean or null


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range, or a list of choices."""

    name: str
    kind: str  # "float", "int" or "categorical"
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    step: float | int | None = None
    choices: tuple = ()

    def suggest(self, trial) -> Value:
        """The value of this setting for an Optuna trial (a retried trial gets its original value back)."""
        if self.kind == "categorical":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Value]:
        """The values the trainer's config must accept for every sample to be accepted: ends or choices."""
        return list(self.choices) if self.kind == "categorical" else [self.low, self.high]

    def grid(self) -> list[Value] | None:
        """Every value, for the grid sampler; None for a continuous range."""
        if self.kind == "categorical":
            return list(self.choices)
        if self.kind == "int":
            return list(range(self.low, self.high + 1, self.step or 1))
        return None

    def describe(self) -> str:
        if self.kind == "categorical":
            return f"{self.name} in {list(self.choices)}"
        scale = "log " if self.log else ""
        step = f" step {self.step}" if self.step else ""
        return f"{self.name} {self.kind} {scale}{self.low}..{self.high}{step}"


@dataclass(frozen=True)
class SearchSpace:
    path: Path
    params: tuple[Param, ...]
    fixed: dict = field(default_factory=dict)  # flat key -> value, model.* keys spelled out
    ds_config: str | None = None
    first: tuple[dict, ...] = ()  # parameter values to try before sampling (Optuna's enqueue_trial)

    def fixed_overrides(self) -> list[str]:
        return [override(key, value) for key, value in self.fixed.items()]

    def overrides(self, values: dict[str, Value]) -> list[str]:
        """key=value arguments of one trial: the fixed settings, then the sampled ones."""
        return self.fixed_overrides() + [override(key, value) for key, value in values.items()]

    def grid(self) -> dict[str, list[Value]]:
        """The grid sampler's search space; a UserError names a continuous range."""
        ranges = [p.name for p in self.params if p.grid() is None]
        if ranges:
            raise UserError(f"--sampler grid needs a finite set of values for every parameter, but {ranges} "
                            f"{'is a' if len(ranges) == 1 else 'are'} float range(s) in {self.path}: "
                            f"give them choices: [...] or use --sampler tpe/random")
        return {p.name: p.grid() for p in self.params}

    def fingerprint(self) -> str:
        """The space as canonical JSON: a rerun must search the space its study was started with."""
        params = {p.name: [p.kind, p.low, p.high, p.log, p.step, list(p.choices)] for p in self.params}
        return json.dumps({"params": params, "fixed": self.fixed, "first": self.first}, sort_keys=True, default=str)


def override(key: str, value: Value) -> str:
    """`key=value` as launch/train.py reads it (numbers, true/false, null and lists in YAML spelling)."""
    return f"{key}={value if isinstance(value, str) else json.dumps(value)}"


def load_space(path: str | Path) -> SearchSpace:
    """Read and check a space file; every mistake is a UserError naming the file and the key."""
    import yaml

    path = Path(path)
    text = read_text_file(path, "--space")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"--space {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"--space {path} must hold a mapping with 'params:' (and optionally 'fixed:', 'ds_config:')")
    unknown = sorted(set(data) - set(SPACE_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown top-level keys {unknown}; a space file has {list(SPACE_KEYS)}")
    params_data = data.get("params")
    if not isinstance(params_data, dict) or not params_data:
        raise UserError(f"{path}: 'params:' must map at least one setting to a range or choices, e.g. "
                        f"lr: {{low: 1.0e-4, high: 3.0e-3, log: true}}")
    fixed = _flatten(data.get("fixed") or {}, path)
    params = tuple(_param(str(name), spec, path) for name, spec in params_data.items())
    clash = sorted({p.name for p in params} & set(fixed))
    if clash:
        raise UserError(f"{path}: {clash} appear in both fixed: and params:; keep each setting in one of them")
    reserved = sorted(set(RESERVED) & ({p.name for p in params} | set(fixed)))
    if reserved:
        raise UserError(f"{path}: {reserved} are set by the sweep for each trial; remove them from the space file")
    ds_config = data.get("ds_config")
    if ds_config is not None and not isinstance(ds_config, str):
        raise UserError(f"{path}: ds_config must be a path such as ds_configs/tiny.json")
    return SearchSpace(path, params, fixed, ds_config, _first_points(data.get("first") or [], params, path))


def _first_points(points: Any, params: tuple[Param, ...], path: Path) -> tuple[dict, ...]:
    """The `first:` list: each a mapping of some parameters to values inside their range or choices."""
    by_name = {p.name: p for p in params}
    if not isinstance(points, list) or not all(isinstance(point, dict) and point for point in points):
        raise UserError(f"{path}: 'first:' must be a list of mappings, e.g. - {{lr: 3.0e-4}}")
    checked = []
    for index, point in enumerate(points):
        where = f"{path}: first[{index}]"
        unknown = sorted(set(map(str, point)) - set(by_name))
        if unknown:
            raise UserError(f"{where}: {unknown} are not in params: ({sorted(by_name)})")
        values = {}
        for name, value in point.items():
            param = by_name[str(name)]
            if param.kind != "categorical":
                value = _number(value, f"{where}.{name}")
                if param.kind == "int" and not isinstance(value, int):
                    raise UserError(f"{where}.{name} = {value} must be an integer (its range is an int range)")
                if not param.low <= value <= param.high:
                    raise UserError(f"{where}.{name} = {value} is outside its range {param.low}..{param.high}")
            elif value not in param.choices:
                raise UserError(f"{where}.{name} = {value!r} is not one of its choices {list(param.choices)}")
            values[param.name] = value
        checked.append(values)
    return tuple(checked)


def _flatten(fixed: Any, path: Path) -> dict:
    if not isinstance(fixed, dict):
        raise UserError(f"{path}: 'fixed:' must map settings to values, e.g. eval_interval: 50")
    flat = {}
    for key, value in fixed.items():
        if key == "model" and isinstance(value, dict):  # the nested spelling of model.* keys
            flat.update({f"model.{k}": v for k, v in value.items()})
        else:
            flat[str(key)] = value
    return flat


def _param(name: str, spec: Any, path: Path) -> Param:
    where = f"{path}: params.{name}"
    if isinstance(spec, list):
        spec = {"choices": spec}
    if not isinstance(spec, dict):
        raise UserError(f"{where} must be a range {{low: .., high: ..}} or {{choices: [..]}}, got {spec!r}")
    if "choices" in spec:
        extra = sorted(set(spec) - {"choices"})
        if extra:
            raise UserError(f"{where}: choices take no {extra}")
        return _categorical(name, spec["choices"], where)
    unknown = sorted(set(spec) - RANGE_KEYS)
    if unknown:
        raise UserError(f"{where}: unknown keys {unknown}; a range has {sorted(RANGE_KEYS)}, a list has 'choices'")
    if "low" not in spec or "high" not in spec:
        raise UserError(f"{where}: a range needs both low: and high:")
    low, high = _number(spec["low"], f"{where}.low"), _number(spec["high"], f"{where}.high")
    step = _number(spec["step"], f"{where}.step") if spec.get("step") is not None else None
    kind = spec.get("type") or ("int" if all(isinstance(v, int) for v in (low, high)) else "float")
    if kind not in ("int", "float"):
        raise UserError(f"{where}: type must be int or float, got {kind!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}: log must be true or false, got {log!r}")
    if kind == "int" and not all(isinstance(v, int) for v in (low, high, step or 1)):
        raise UserError(f"{where}: an int range needs integer low, high and step; write type: float for a float range")
    if kind == "float":
        low, high, step = float(low), float(high), (float(step) if step is not None else None)
    if low > high:
        raise UserError(f"{where}: empty range: low {low} is above high {high}")
    if low == high:
        raise UserError(f"{where}: the range {low}..{high} holds one value; put the setting under fixed:")
    if log and low <= 0:
        raise UserError(f"{where}: a log range must start above 0, got low {low}")
    if step is not None and step <= 0:
        raise UserError(f"{where}: step must be positive, got {step}")
    if log and step not in (None, 1):
        raise UserError(f"{where}: a log range takes no step")
    return Param(name, kind, low, high, log, step)


def _categorical(name: str, choices: Any, where: str) -> Param:
    if not isinstance(choices, list) or not choices:
        raise UserError(f"{where}: empty choices; list at least two values, e.g. choices: [0.0, 0.1]")
    if any(not (c is None or isinstance(c, (bool, int, float, str))) for c in choices):
        raise UserError(f"{where}: choices must be numbers, strings, true/false or null, got {choices!r}")
    if len(choices) < 2:
        raise UserError(f"{where}: one choice only ({choices[0]!r}); put the setting under fixed:")
    if len(set(map(repr, choices))) != len(choices):
        raise UserError(f"{where}: choices repeat a value: {choices!r}")
    return Param(name, "categorical", choices=tuple(choices))


def _number(value: Any, where: str) -> int | float:
    """A YAML number; also "1e-4", which YAML 1.1 reads as a string."""
    if isinstance(value, str):
        for kind in (int, float):
            try:
                value = kind(value)
                break
            except ValueError:
                pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {value!r}")
    return value
