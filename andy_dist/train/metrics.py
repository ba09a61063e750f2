"""One `log(step, dict)` on rank 0, fanned out to the console, RUN/metrics.jsonl and W&B.

    logger = MetricsLogger("runs/NAME", config, is_main=rank == 0, total_steps=1000)
    logger.log(step, {"train/loss": 2.3, "train/lr": 3e-4, "train/mfu": meter(tok_s)})
    logger.log_samples(step, [{"prompt": "...", "completion": "...", "temperature": 0.8}])
    logger.close()

Files in the run directory (always written on rank 0, whatever the W&B mode):

- `config.json`: the full resolved configuration, written at start;
- `metrics.jsonl`: one JSON object per `log` call: {"step", "time", key: value...}; a value
  that is unknown (None, e.g. MFU on an unknown GPU) is written "n/a", a non-finite float
  "nan"/"inf"/"-inf", so that every line is strict JSON; appended to on resume;
- `samples.jsonl`: one object per generated sample: {"step", "prompt", "completion", ...};
- `wandb/`: the W&B run files (offline runs are synced later with `wandb sync RUN/wandb/offline-run-*`);
- `wandb.json`: the W&B run's id, project, entity and mode (no secrets).

W&B logs against the metric "step" (`define_metric("*", step_metric="step")`), not W&B's own
step counter, so a run resumed from an older checkpoint can log its steps again.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional
from urllib.parse import urlparse

from andy_dist import UserError
from andy_dist.cli import atomic_path
from andy_dist.train.linelog import LineLog

WANDB_MODES = ("online", "offline", "disabled")

# The standard keys, with what they mean; the report titles its plots with these.
METRIC_KEYS: dict[str, str] = {
    "train/loss": "training loss (nats/token)",
    "train/lr": "learning rate",
    "train/grad_norm": "gradient norm (before clipping)",
    "train/tokens_per_s": "tokens/s, all ranks, wall clock (everything between two log lines)",
    "train/tokens_per_s_per_rank": "tokens/s per rank, wall clock",
    "train/tokens_per_s_compute": "tokens/s, all ranks, inside the optimizer steps only",
    "train/data_wait_fraction": "share of the wall clock spent waiting for batches",
    "train/mfu": "model FLOPs utilization, wall clock (each sample at its own length)",
    "train/mfu_compute": "model FLOPs utilization inside the optimizer steps only",
    "train/global_batch_seqs": "global batch (sequences)",
    "train/global_batch_tokens": "global batch (tokens)",
    "train/padding_fraction": "padding fraction",
    "train/loss_scale": "fp16 loss scale",
    "train/skipped_steps": "steps skipped for a non-finite loss or gradient",
    "train/overflow_skips": "steps skipped by fp16 loss scaling (gradient overflow)",
    "train/tokens_seen": "tokens seen",
    "train/epoch": "epoch",
    "sys/memory_gb": "memory in use (GB)",
    "time/elapsed_s": "elapsed (s)",
    "time/eta_s": "ETA (s)",
    "val/loss": "validation loss (nats/token)",
    "val/ppl": "validation perplexity",
    "val/bpb": "validation bits per byte",
    "val/best_loss": "best validation loss so far",
    "val/bad_evals": "evaluations without improvement",
    "val/patience": "early-stopping patience",
    "samples/logprob": "training samples: mean log-prob per generated token under the model (nats)",
    "samples/distinct_1": "training samples: distinct unigrams / unigrams",
    "samples/distinct_2": "training samples: distinct bigrams / bigrams",
    "samples/repeat_3gram": "training samples: share of 3-grams that repeat an earlier one",
    "samples/eos_fraction": "training samples: share that ended with EOS",
    "samples/length": "training samples: generated tokens (EOS excluded)",
}
FP16_KEYS = ("train/loss_scale",)
VAL_KEYS = tuple(k for k in METRIC_KEYS if k.startswith("val/"))
SAMPLE_KEYS = tuple(k for k in METRIC_KEYS if k.startswith("samples/"))
TRAIN_KEYS = tuple(k for k in METRIC_KEYS if k not in VAL_KEYS + SAMPLE_KEYS + FP16_KEYS)
NA = "n/a"


# ---------------------------------------------------------------- derived figures


def bits_per_byte(loss_nats_per_token: float, tokens: int, text_bytes: int) -> float:
    """Bits per UTF-8 byte of text: loss * tokens / (bytes * ln 2).

    Unlike loss per token, this does not depend on the tokenizer, so runs with different
    vocabularies compare on it.
    """
    if text_bytes <= 0:
        raise ValueError(f"text_bytes must be positive, got {text_bytes}")
    return loss_nats_per_token * tokens / (text_bytes * math.log(2))


def perplexity(loss_nats_per_token: float) -> float:
    """exp(loss), inf instead of an OverflowError for a diverged model."""
    return math.exp(loss_nats_per_token) if loss_nats_per_token < 700 else math.inf


def validation_metrics(loss: float, tokens: int, text_bytes: int, best_loss: float, bad_evals: int,
                       patience: int) -> dict:
    """The standard `val/*` keys from the raw figures of one evaluation."""
    return {
        "val/loss": loss,
        "val/ppl": perplexity(loss),
        "val/bpb": bits_per_byte(loss, tokens, text_bytes),
        "val/best_loss": best_loss,
        "val/bad_evals": bad_evals,
        "val/patience": patience,
    }


def memory_gb(device=None) -> float:
    """Memory in use, in GB (1e9 bytes): allocated CUDA memory on a CUDA device, else process RSS."""
    import torch

    if device is not None and torch.device(device).type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e9
    try:  # Linux: current resident set, in pages
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9
    except (OSError, ValueError, IndexError):
        import resource  # elsewhere: the peak, the best available figure

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 1e9 if sys.platform == "darwin" else peak * 1024 / 1e9


# ---------------------------------------------------------------- W&B mode


def _wandb_host(environ: Mapping[str, str]) -> str:
    return urlparse(environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"


def wandb_logged_in(environ: Optional[Mapping[str, str]] = None) -> tuple[bool, str]:
    """(logged in, how we know): an API key in WANDB_API_KEY or in the netrc file for the W&B host."""
    environ = os.environ if environ is None else environ
    if environ.get("WANDB_API_KEY"):
        return True, "WANDB_API_KEY is set"
    path = Path(environ.get("NETRC") or Path(environ.get("HOME", Path.home())) / ".netrc")
    host = _wandb_host(environ)
    try:
        entry = netrc.netrc(str(path)).authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        entry = None
    if entry and entry[2]:
        return True, f"an API key for {host} is in {path}"
    return False, f"no WANDB_API_KEY and no API key for {host} in {path}"


def _choose_wandb_mode(requested: Optional[str], environ: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    environ = os.environ if environ is None else environ
    if requested is not None:
        if requested not in WANDB_MODES:
            raise UserError(f"--wandb must be one of {', '.join(WANDB_MODES)}, got {requested!r}")
        return requested, "as asked"
    if environ.get("WANDB_MODE"):
        mode = {"dryrun": "offline", "run": "online"}.get(environ["WANDB_MODE"], environ["WANDB_MODE"])
        if mode in WANDB_MODES:
            return mode, f"WANDB_MODE={environ['WANDB_MODE']} in the environment"
    if environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
        return "disabled", "WANDB_DISABLED is set"
    logged_in, why = wandb_logged_in(environ)
    if logged_in:
        return "online", f"logged in ({why})"
    return "offline", f"not logged in ({why}); sync later with `wandb sync`"


def resolve_wandb_mode(requested: Optional[str], environ: Optional[Mapping[str, str]] = None) -> str:
    """The W&B mode to use: `requested` if given (checked), else WANDB_MODE from the environment,
    else online when logged in (API key in the environment or netrc), else offline."""
    return _choose_wandb_mode(requested, environ)[0]


# ---------------------------------------------------------------- the logger


def _jsonable(value: Any) -> Any:
    """Plain JSON for one metric value: tensors and numpy scalars become numbers; None -> "n/a";
    non-finite floats -> "nan"/"inf"/"-inf" (strict JSON has no NaN)."""
    if value is None:
        return NA
    if hasattr(value, "item") and callable(value.item):  # torch / numpy scalar
        value = value.item()
    if isinstance(value, bool) or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _wandb_value(value: Any) -> Any:
    """The value to send to W&B, or None to leave it out (unknowns and text make no chart)."""
    value = _jsonable(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value


def _format(key: str, value: Any) -> str:
    if isinstance(value, str):
        return value
    if key.endswith("tokens_per_s"):
        return f"{value:,.0f}"
    if key.endswith("mfu"):
        return f"{100 * value:.1f}%"
    if key.endswith("_s"):
        return _duration(value)
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4f}"
    return str(value)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


# What the console shows of a training log call, in order, with short names.
CONSOLE_KEYS = (
    ("train/loss", "loss"),
    ("train/lr", "lr"),
    ("train/grad_norm", "gnorm"),
    ("train/tokens_per_s", "tok/s"),
    ("train/mfu", "mfu"),
    ("time/eta_s", "eta"),
)
VAL_CONSOLE_KEYS = (("val/loss", "val"), ("val/ppl", "ppl"), ("val/bpb", "bpb"), ("val/best_loss", "best"))


class Console:
    """A tqdm progress bar on a terminal; plain lines (one per log call) in a log file."""

    def __init__(self, total_steps: Optional[int], stream=None):
        self.stream = stream or sys.stderr
        self.total_steps = total_steps
        self.bar = None
        if getattr(self.stream, "isatty", lambda: False)():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, file=self.stream, unit="step", dynamic_ncols=True)

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def update(self, step: int, values: Mapping[str, Any]) -> None:
        shown = [(short, _format(key, _jsonable(values[key]))) for key, short in CONSOLE_KEYS if key in values]
        val = [(short, _format(key, _jsonable(values[key]))) for key, short in VAL_CONSOLE_KEYS if key in values]
        if val:
            if "val/bad_evals" in values:
                val.append(("no-improve", f"{values['val/bad_evals']}/{values.get('val/patience', '?')}"))
            self.write(f"step {step} | " + " ".join(f"{k} {v}" for k, v in val))
        if self.bar is not None:
            self.bar.n = step
            if shown:
                self.bar.set_postfix_str(" ".join(f"{k}={v}" for k, v in shown), refresh=False)
            self.bar.refresh()
        elif shown:
            total = f"/{self.total_steps}" if self.total_steps else ""
            self.write(f"step {step}{total} | " + " ".join(f"{k} {v}" for k, v in shown))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class MetricsLogger:
    """Rank 0's single sink for metrics and samples; on other ranks every method is a no-op.

    wandb_mode: "online" | "offline" | "disabled" | None (auto: see `resolve_wandb_mode`; one
    line on the console says which and why). resume_id: the W&B run id stored in a checkpoint;
    the resumed run continues that W&B run (resume="allow") and appends to metrics.jsonl.
    """

    def __init__(
        self,
        run_dir,
        config: dict,
        is_main: bool,
        wandb_mode: Optional[str] = None,
        project: str = "andy-llm",
        entity: Optional[str] = None,
        run_name: Optional[str] = None,
        tags: Iterable[str] = (),
        group: Optional[str] = None,
        resume_id: Optional[str] = None,
        total_steps: Optional[int] = None,
        console_stream=None,
    ):
        self.run_dir = Path(run_dir)
        self.is_main = is_main
        self.wandb_run_id: Optional[str] = resume_id
        self.wandb_mode, reason = _choose_wandb_mode(wandb_mode)  # checked on every rank: same error everywhere
        self._run = None
        self._closed = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(self.run_dir / "config.json") as tmp:
            tmp.write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
        self.console = Console(total_steps, console_stream)
        # Every line reaches the file as soon as it is logged (a crash loses nothing already logged,
        # a resumed run appends to the same file), and a full disk delays lines instead of raising.
        self._metrics = LineLog(self.run_dir / "metrics.jsonl", self.console.write)
        self._samples = LineLog(self.run_dir / "samples.jsonl", self.console.write)
        self.console.write(f"W&B: {self.wandb_mode} ({reason})")
        if self.wandb_mode != "disabled":
            self._start_wandb(config, project, entity, run_name, tuple(tags), group, resume_id)

    def _start_wandb(self, config, project, entity, run_name, tags, group, resume_id) -> None:
        import wandb

        # W&B validates WANDB_MODE from the environment even when mode= is passed: an empty or
        # contradicting value (WANDB_MODE= exported by a shell profile) would stop the run.
        os.environ["WANDB_MODE"] = self.wandb_mode
        # A fresh run lets W&B pick the id; a resumed one names it, and resume="allow" continues it.
        kwargs = dict(project=project, entity=entity, name=run_name or self.run_dir.name, tags=list(tags),
                      group=group, config=config, dir=str(self.run_dir), id=resume_id,
                      resume="allow" if resume_id else None)
        try:
            self._run = wandb.init(mode=self.wandb_mode, **kwargs)
        except Exception as err:  # an online run must never stop training: fall back to local files
            if self.wandb_mode != "online":
                raise
            self.console.write(f"W&B: online start failed ({err}); continuing offline, sync later with `wandb sync`")
            self.wandb_mode = "offline"
            self._run = wandb.init(mode="offline", **kwargs)
        self.wandb_run_id = self._run.id
        # Where the W&B run lives, for tools/report.py --wandb-report and for `wandb sync`.
        info = {"id": self._run.id, "project": self._run.project, "entity": self._run.entity or entity,
                "mode": self.wandb_mode, "dir": str(Path(self._run.dir).parent)}
        with atomic_path(self.run_dir / "wandb.json") as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
        self._run.define_metric("step")
        self._run.define_metric("*", step_metric="step")

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Write one set of metrics for `step` to the console, metrics.jsonl and W&B (rank 0 only)."""
        if not self.is_main or self._closed:
            return
        record = {"step": int(step), "time": round(time.time(), 3)}
        record.update({key: _jsonable(value) for key, value in values.items()})
        self._metrics.write(json.dumps(record))
        self.console.update(int(step), values)
        if self._run is not None:
            data = {key: v for key, v in ((k, _wandb_value(v)) for k, v in values.items()) if v is not None}
            self._run.log({**data, "step": int(step)})

    def log_samples(self, step: int, rows: list[dict]) -> None:
        """Generated samples: one line each in samples.jsonl and a W&B table "samples" (rank 0 only).

        Each row holds "prompt" and "completion" and the sampler settings used (temperature, ...).
        """
        if not self.is_main or self._closed or not rows:
            return
        for row in rows:
            if "prompt" not in row or "completion" not in row:
                raise ValueError(f"a sample needs 'prompt' and 'completion', got keys {sorted(row)}")
            self._samples.write(json.dumps({"step": int(step), **{k: _jsonable(v) for k, v in row.items()}}))
        first = rows[0]["completion"].replace("\n", " ")
        self.console.write(f"step {step} | sample: {rows[0]['prompt']!r} -> {first[:80]!r}")
        if self._run is not None:
            import wandb

            extra = sorted({k for row in rows for k in row} - {"prompt", "completion"})
            columns = ["step", "prompt", "completion", *extra]
            data = [[int(step), row["prompt"], row["completion"], *(_jsonable(row.get(k)) for k in extra)]
                    for row in rows]
            self._run.log({"samples": wandb.Table(columns=columns, data=data), "step": int(step)})

    def close(self) -> None:
        """Flush and close the files, close the progress bar, finish the W&B run. Safe to call twice."""
        if not self.is_main or self._closed:
            return
        self._closed = True
        self._metrics.close()
        self._samples.close()
        self.console.close()
        if self._run is not None:
            import wandb

            self._run.finish()
            # wandb 0.31's finish() can return before its service has written the run's .wandb
            # transaction log (seen: 4 in 12 offline runs left a 7-byte file). teardown() stops the
            # service, which flushes the log first, so the offline run is complete when close() returns.
            wandb.teardown()
            self._run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
