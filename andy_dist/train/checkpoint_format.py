"""The on-disk checkpoint format, in one place: names, the meta and its version rule, `latest`, tags, file vetting.

Layout of `RUN/checkpoints/`:

    latest               tag of the newest COMPLETE checkpoint (rewritten atomically, last)
    step-000050/         DeepSpeed's files for that tag, then andy_meta.json written last
    best/                the best checkpoint by validation loss (same layout)
    tokenizer.model      the run's tokenizer, so a checkpoint folder is self-contained

A tag is complete when its `andy_meta.json` exists. The meta holds the format version, the model
config, the trainer's state and the size of every file of the tag. Format versions 1 up to
`FORMAT_VERSION` are read; a newer one asks for a newer andy_dist, and a meta without a version
number (every andy_dist writes one) is damaged.

Saving and resuming through the engine is `andy_dist.train.checkpoint`; consolidating a tag into
fp32 weights is `andy_dist.infer.export`. This module imports neither DeepSpeed nor the engine:
its safe loader only looks up the few DeepSpeed classes its allow-list names, when it runs.
"""

from __future__ import annotations

import importlib
import json
import os
import re
from pathlib import Path

import torch

from andy_dist import UserError

META_FILE = "andy_meta.json"
LATEST_FILE = "latest"
BEST_TAG = "best"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1
_STEP_TAG = re.compile(r"^step-(\d+)$")
# The only non-tensor classes DeepSpeed puts in its checkpoint files (module, name).
_DEEPSPEED_SAFE_GLOBALS = (
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
)


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


# ---------------------------------------------------------------------------------------------
# Tags and `latest`


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Every complete tag (one with a meta) under `ckpt_dir`, sorted by name."""
    ckpt_dir = Path(ckpt_dir)
    return sorted(p.name for p in ckpt_dir.iterdir() if (p / META_FILE).is_file()) if ckpt_dir.is_dir() else []


def complete_step_tags(ckpt_dir: Path) -> list[tuple[int, str]]:
    """(step, tag) of every complete `step-N` tag under `ckpt_dir`, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    found = []
    for path in ckpt_dir.iterdir() if ckpt_dir.is_dir() else []:
        match = _STEP_TAG.match(path.name)
        if match and (path / META_FILE).is_file():
            found.append((int(match.group(1)), path.name))
    return sorted(found)


def read_latest(ckpt_dir: Path, fix: str | None = None) -> str | None:
    """The tag the `latest` file names; None when there is no `latest` file.

    A `latest` that does not hold a tag name (not text, empty, a path) is damaged: a `UserError` that
    ends with `fix`, by default how to repair the file."""
    path = Path(ckpt_dir) / LATEST_FILE
    if not path.is_file():
        return None
    try:
        tag = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        shown = "not text"
    else:
        if tag and "/" not in tag and "\n" not in tag and len(tag) <= 200:
            return tag
        shown = repr(tag[:40])
    fix = fix or f"write the tag to use into it, one of {complete_tags(ckpt_dir)}"
    raise UserError(f"{path} does not hold a tag name ({shown}): it is damaged; {fix}")


def write_latest(ckpt_dir: Path, tag: str) -> None:
    _write_atomic(Path(ckpt_dir) / LATEST_FILE, tag + "\n")


def checkpoint_dir(path: str | Path) -> Path:
    """The checkpoints directory named by `path`: CKPT itself, or a run directory holding checkpoints/."""
    ckpt = Path(path)
    if not ckpt.is_dir():
        raise UserError(f"checkpoint directory {ckpt} does not exist; pass runs/NAME/checkpoints")
    if not (ckpt / LATEST_FILE).exists() and (ckpt / "checkpoints").is_dir():
        ckpt = ckpt / "checkpoints"
    return ckpt


def resolve_checkpoint(path: str | Path, tag: str = "latest") -> tuple[Path, str]:
    """(checkpoints directory, tag directory name) for `path` (CKPT or a run directory holding
    checkpoints/) and `tag` ("latest", "best" or a tag name)."""
    ckpt = checkpoint_dir(path)
    if tag == "latest":
        tag = read_latest(ckpt, fix=f"pass --tag with one of {complete_tags(ckpt)}")
        if tag is None:
            raise UserError(f"{ckpt} has no '{LATEST_FILE}' file; pass --tag with one of {complete_tags(ckpt)}")
    if not (ckpt / tag).is_dir():
        raise UserError(f"checkpoint tag {tag!r} is not in {ckpt}; available tags: {complete_tags(ckpt)}")
    return ckpt, tag


# ---------------------------------------------------------------------------------------------
# The meta


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """The size of every file of a tag but its meta, by path relative to the tag: the meta's file list."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size
            for p in sorted(Path(tag_dir).rglob("*")) if p.is_file() and p.name != META_FILE}


def write_meta(tag_dir: Path, meta: dict) -> None:
    """Mark `tag_dir` complete: write `meta` with the format version and the tag's file list, atomically.

    Call it only once every rank's files of the tag are on disk."""
    full = {**meta, "format": FORMAT_VERSION, "files": file_sizes(tag_dir)}
    _write_atomic(Path(tag_dir) / META_FILE, json.dumps(full, indent=1, sort_keys=True))


def read_meta(tag_dir: Path) -> dict:
    """The meta of a tag, checked: JSON, a model config, a format version this code reads (1 up to
    `FORMAT_VERSION`; a newer one needs a newer andy_dist), a file list of sizes."""
    tag_dir = Path(tag_dir)
    path = tag_dir / META_FILE
    if not path.is_file():
        raise UserError(f"{tag_dir} has no {META_FILE}: it was not written by andy_dist's trainer "
                        f"(or the save did not finish); choose another tag")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); the checkpoint is damaged: choose another tag") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise UserError(f"{path} has no model_config; the checkpoint is damaged or not andy_dist's")
    version = meta.get("format")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise UserError(f"{path} has no valid format version ({version!r}); the checkpoint is damaged or "
                        f"not andy_dist's: choose another tag")
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has format {version}, newer than this version reads ({FORMAT_VERSION}); "
                        f"upgrade andy_dist")
    files = meta.get("files", {})
    if not isinstance(files, dict) or not all(isinstance(size, int) for size in files.values()):
        raise UserError(f"{path} has a damaged file list; choose another tag")
    return meta


def check_file_sizes(tag_dir: Path, meta: dict) -> None:
    """Every file the meta lists is present with its recorded size (a lost or truncated rank file is named)."""
    tag_dir = Path(tag_dir)
    for name, size in meta.get("files", {}).items():
        path = tag_dir / name
        if not path.is_file():
            raise UserError(f"checkpoint file {path} is missing; the checkpoint {tag_dir.name} cannot be loaded "
                            f"(restore the file or resume from another tag)")
        if path.stat().st_size != size:
            raise UserError(f"checkpoint file {path} is truncated or altered ({path.stat().st_size} bytes, "
                            f"expected {size}); restore it or resume from another tag")


# ---------------------------------------------------------------------------------------------
# Reading tensor files without running code


def _safe_globals() -> list:
    found = []
    for module, name in _DEEPSPEED_SAFE_GLOBALS:
        try:
            found.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass  # an older/newer DeepSpeed without this class cannot have pickled it either
    return found


def load_safely(path: Path) -> dict:
    """torch.load with weights_only=True and the DeepSpeed allow-list; a clear error otherwise."""
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unreadable file
        lines = str(err).strip().splitlines() or [repr(err)]
        detail = next((line.strip() for line in lines if "Unsupported global" in line), lines[0])
        raise UserError(f"cannot read {path} safely: {detail}") from None


def verify_checkpoint_files(tag_dir: str | Path) -> None:
    """Check that every *.pt file of a checkpoint tag loads with weights_only=True (and the DeepSpeed
    allow-list). DeepSpeed's own loader (`engine.load_checkpoint`, `ds_to_universal`) unpickles with
    weights_only=False, so `--resume` calls this first: a file carrying code is refused, never run."""
    for path in sorted(Path(tag_dir).rglob("*.pt")):
        load_safely(path)


def _write_atomic(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a crash or power cut leaves the old or the new file, never a torn one:
    a temporary file is written and fsynced, renamed over `path`, and the directory entry fsynced."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make the entries of `directory` (files created, renamed or deleted in it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
