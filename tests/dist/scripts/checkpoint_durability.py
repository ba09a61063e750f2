"""Saves through a real DeepSpeed engine (run by tests/dist/test_checkpoint_durability.py), watched closely.

Every os.fsync and os.replace the save makes is recorded with the path it touched, so the test can check
the order a power cut needs: every file, the meta and the folders fsynced before the tag is swapped in
and `latest` names it. Then a re-save of an existing tag is interrupted before its commit (the old tag
must stay complete), done properly (replaced, nothing left over), and a save that hits a file size
limit (RLIMIT_FSIZE: write(2) fails with EFBIG) must end in the one-line error and keep the old tag.
Writes the observations as JSON to argv[1]; the checkpoints go to argv[2].
"""

import json
import os
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

import torch  # noqa: E402

from andy_dist import UserError  # noqa: E402
from andy_dist.cli import run_tool  # noqa: E402
from andy_dist.config import ModelConfig  # noqa: E402
from andy_dist.model import AndyLM  # noqa: E402
from andy_dist.train import checkpoint as ckpt  # noqa: E402
from andy_dist.train.distenv import detect  # noqa: E402
from andy_dist.train.engine import build_engine, init_distributed, shutdown_distributed  # noqa: E402

CFG = ModelConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2, dropout=0.0)
META = {"model_config": CFG.to_dict(), "world_size": 1}


class Recorder:
    """Wraps os.fsync and os.replace; `events` lists ("fsync", path) and ("replace", src, dst) in order."""

    def __init__(self):
        self.events: list = []
        self._fsync, self._replace = os.fsync, os.replace

    def __enter__(self):
        def fsync(fd):
            self.events.append(["fsync", os.readlink(f"/proc/self/fd/{fd}")])
            return self._fsync(fd)

        def replace(src, dst, **kwargs):
            self.events.append(["replace", str(src), str(dst)])
            return self._replace(src, dst, **kwargs)

        os.fsync, os.replace = fsync, replace
        return self

    def __exit__(self, *exc):
        os.fsync, os.replace = self._fsync, self._replace


def engine():
    torch.manual_seed(0)
    ds = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1, "train_batch_size": 1,
          "zero_optimization": {"stage": 1}, "steps_per_print": 10**9,
          "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}}
    return build_engine(AndyLM(CFG), ds, weight_decay=0.0)


def listing(ckpt_dir: Path) -> list[str]:
    """The tags and `latest` (DeepSpeed also copies its zero_to_*.py scripts there)."""
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() or p.name == "latest")


def crash(tag):
    raise RuntimeError(f"power cut before {tag} was committed")


def main():
    out, ckpt_dir = Path(sys.argv[1]), Path(sys.argv[2])
    init_distributed(detect())
    model = engine()
    found = {}
    with Recorder() as recorder:
        ckpt.save(model, ckpt_dir, "step-000001", {"step": 1}, META)
    found["events"] = recorder.events
    found["files"] = sorted(str(p) for p in (ckpt_dir / "step-000001").rglob("*") if p.is_file())
    first_meta = (ckpt_dir / "step-000001" / "andy_meta.json").read_text()
    try:
        ckpt.save(model, ckpt_dir, "step-000001", {"step": 1}, META, before_commit=crash)
    except RuntimeError as err:
        found["crash"] = str(err)
    found["after_crash"] = {"meta_unchanged": (ckpt_dir / "step-000001" / "andy_meta.json").read_text() == first_meta,
                            "listing": listing(ckpt_dir)}
    ckpt.save(model, ckpt_dir, "step-000001", {"step": 1}, META)
    found["after_resave"] = {"meta_changed": (ckpt_dir / "step-000001" / "andy_meta.json").read_text() != first_meta,
                             "listing": listing(ckpt_dir)}
    meta_before = (ckpt_dir / "step-000001" / "andy_meta.json").read_text()
    resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
    try:
        ckpt.save(model, ckpt_dir, "step-000002", {"step": 2}, META)
    except UserError as err:
        found["size_limit"] = str(err)
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    found["after_size_limit"] = {"listing": listing(ckpt_dir),
                                 "meta_unchanged": (ckpt_dir / "step-000001" / "andy_meta.json").read_text()
                                 == meta_before}
    out.write_text(json.dumps(found))
    shutdown_distributed()


if __name__ == "__main__":
    run_tool(main)
