"""What a training step would cost a GPU's host, counted on any machine (the overhead tests and
`tools/bench.py overhead` use this; nothing on the training path imports it).

On a GPU the host launches one kernel per ATen op that computes and waits whenever it must read a
value back. Both can be counted on a CPU:

  compute ops    every ATen op dispatched, except views and allocations (no kernel on CUDA); a
                 `TorchDispatchMode` sees them all, from the model, autograd, DeepSpeed and us
  host syncs     `aten._local_scalar_dense` (each `.item()`, `bool()`/`float()` of a tensor: a device-to-host
                 copy that drains the GPU queue), each `.tolist()` / `.numpy()` (one copy of the whole
                 tensor; on a CPU tensor they reach no ATen op, so they are counted where they are called),
                 plus every `synchronize()` of DeepSpeed's accelerator or of a stream

DeepSpeed asks its accelerator whether the device is synchronous; its CPU accelerator says yes, and
DeepSpeed then skips the synchronizes and stream handling it does on CUDA. `cuda_like_accelerator()`
makes the CPU accelerator answer as CUDA does (and gives it no-op streams), so a count taken on a CPU
is the count of a GPU run. Each op can also be charged to the innermost frame of DeepSpeed, this
project or torch's optimizers that caused it (`attribute=True`; slower).
"""

from __future__ import annotations

import traceback
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Ops that make no kernel on CUDA: views, aliasing and allocation.
NO_KERNEL_OPS = frozenset({
    "aten.view", "aten.detach", "aten.t", "aten.transpose", "aten.slice", "aten.expand", "aten._unsafe_view",
    "aten.alias", "aten.as_strided", "aten.unsqueeze", "aten.squeeze", "aten.split", "aten.split_with_sizes",
    "aten.select", "aten.permute", "aten._reshape_alias", "aten.narrow", "aten.unbind", "aten.empty",
    "aten.empty_strided", "aten.new_empty", "aten.new_empty_strided", "aten.lift_fresh", "aten.set_",
    "aten._local_scalar_dense", "aten.is_same_size", "aten.empty_like", "aten.unflatten", "aten.view_as",
    "aten.reshape", "aten.flatten", "aten.expand_as", "aten.chunk", "aten.sym_size", "aten.sym_stride",
    "aten.sym_numel", "aten.sym_storage_offset", "aten.dim", "aten.is_contiguous", "aten.record_stream",
})
SCALAR_READ = "aten._local_scalar_dense"

_ACTIVE: list["OverheadCounter"] = []


def call_site(skip_innermost: int = 0) -> str:
    """The innermost frame of DeepSpeed, this project or torch's optimizer/clipping code on the stack,
    as "package/path.py:function"; "autograd (backward of model ops)" when none (the autograd engine)."""
    for frame in reversed(traceback.extract_stack()[:-(1 + skip_innermost) or None]):
        name = frame.filename.replace("\\", "/")
        if name.endswith("andy_dist/train/overhead.py"):
            continue
        for marker, label in (("/deepspeed/", "deepspeed/"), ("/andy_dist/", "andy_dist/"),
                              ("/tools/benchmarks/", "tools/benchmarks/"), ("/tests/", "tests/")):
            if marker in name:
                return f"{label}{name.split(marker)[-1]}:{frame.name}"
        if "torch/optim/" in name or "clip_grad" in name:
            return f"torch/{name.split('torch/')[-1]}:{frame.name}"
    return "autograd (backward of model ops)"


def line_site() -> str:
    """The innermost DeepSpeed / project line on the stack, with its source text (for host syncs)."""
    for frame in reversed(traceback.extract_stack()[:-1]):
        name = frame.filename.replace("\\", "/")
        if name.endswith("andy_dist/train/overhead.py") or "/torch/" in name:
            continue
        for marker, label in (("/deepspeed/", "deepspeed/"), ("/andy_dist/", "andy_dist/"),
                              ("/tools/benchmarks/", "tools/benchmarks/"), ("/tests/", "tests/")):
            if marker in name:
                return f"{label}{name.split(marker)[-1]}:{frame.lineno} {(frame.line or '').strip()[:80]}"
    return "(outside DeepSpeed and the project)"


@dataclass
class StepCount:
    """What one counted stretch of code dispatched."""

    ops: Counter = field(default_factory=Counter)  # op name -> calls
    compute_by_site: Counter = field(default_factory=Counter)  # call site -> compute ops (attribute=True)
    syncs_by_site: Counter = field(default_factory=Counter)  # source line -> host syncs
    scalar_reads: int = 0
    synchronizes: int = 0

    @property
    def compute_ops(self) -> int:
        return sum(n for op, n in self.ops.items() if op not in NO_KERNEL_OPS)

    @property
    def host_syncs(self) -> int:
        return self.scalar_reads + self.synchronizes


class OverheadCounter(TorchDispatchMode):
    """Counts the ops and host syncs of the code run inside `with OverheadCounter() as counter:`."""

    def __init__(self, attribute: bool = False):
        super().__init__()
        self.attribute = attribute
        self.count = StepCount()

    def __enter__(self):
        if not _ACTIVE:
            _count_tensor_reads(install=True)
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        _ACTIVE.remove(self)
        if not _ACTIVE:
            _count_tensor_reads(install=False)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        count = self.count
        count.ops[name] += 1
        if name == SCALAR_READ:
            count.scalar_reads += 1
            count.syncs_by_site[line_site()] += 1
        elif self.attribute and name not in NO_KERNEL_OPS:
            count.compute_by_site[call_site()] += 1
        return func(*args, **(kwargs or {}))

    def note_synchronize(self) -> None:
        self.count.synchronizes += 1
        self.count.syncs_by_site[line_site()] += 1

    def note_read(self) -> None:
        self.count.scalar_reads += 1
        self.count.syncs_by_site[line_site()] += 1


def _note_synchronize() -> None:
    for counter in _ACTIVE:
        counter.note_synchronize()


_TENSOR_READS = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}


def _count_tensor_reads(install: bool) -> None:
    """While a counter is active, `.tolist()` and `.numpy()` count as one host read each."""
    for name, original in _TENSOR_READS.items():
        if not install:
            setattr(torch.Tensor, name, original)
            continue

        def counted(self, *args, _original=original, **kwargs):
            for counter in _ACTIVE:
                counter.note_read()
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, counted)


class _CountingStream:
    """A stream for a device without streams: waits are free, a synchronize is counted."""

    def wait_stream(self, other):
        pass

    def wait_event(self, event):
        pass

    def synchronize(self):
        _note_synchronize()

    def record_event(self, event=None):
        return None

    def query(self):
        return True


@contextmanager
def cuda_like_accelerator():
    """DeepSpeed's CPU accelerator made to answer as CUDA does (asynchronous device, streams), every
    synchronize() counted by the active `OverheadCounter`s; restored on exit."""
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if acc.device_name() != "cpu":
        yield  # a real GPU: DeepSpeed already takes its CUDA branches, and synchronize() is real
        return
    stream = _CountingStream()
    real_sync = acc.synchronize

    def counting_synchronize(*args, **kwargs):
        _note_synchronize()
        return real_sync(*args, **kwargs)

    patched = {"resolves_data_dependency": lambda: False, "is_synchronized_device": lambda: False,
               "use_host_timers": lambda: True, "synchronize": counting_synchronize,
               "current_stream": lambda *a, **k: stream, "default_stream": lambda *a, **k: stream}
    saved = {name: acc.__dict__.get(name) for name in patched}
    stream_property = type(acc).__dict__.get("Stream")
    record_stream = torch.Tensor.record_stream
    try:
        for name, value in patched.items():
            setattr(acc, name, value)
        type(acc).Stream = property(lambda self: (lambda *a, **k: _CountingStream()))
        torch.Tensor.record_stream = lambda self, stream: None
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                acc.__dict__.pop(name, None)
            else:
                setattr(acc, name, value)
        if stream_property is None:
            delattr(type(acc), "Stream")
        else:
            type(acc).Stream = stream_property
        torch.Tensor.record_stream = record_stream
