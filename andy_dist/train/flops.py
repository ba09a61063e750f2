"""FLOPs per token, peak FLOP/s of the device, and model FLOPs utilization (MFU).

The formula (PaLM appendix B / nanoGPT / Chinchilla "6N"), for the `AndyLM` in `model.py`::

    N_matmul = L * (4 + 2 * ffn_mult) * d^2      # qkv d->3d, proj d->d, ffn d->4d, 4d->d per block
             + d * V                             # the LM head (counted, tied or not)
    forward  = 2 * N_matmul + 4 * L * d * T      # per token: 2 FLOPs per weight, plus
                                                 # scores Q K^T and A V over all T keys
    training = 3 * forward = 6 * N_matmul + 12 * L * d * T   # backward costs twice the forward

What is not counted, on purpose: the embedding lookup (a gather, no multiply), sinusoidal
positions (no parameters), biases, LayerNorm, GELU, softmax, dropout and the loss (all
O(d) per token, under 1% here). Attention is counted over the full T x T score matrix even
though a causal kernel skips about half of it: this is the convention published MFU figures
use, so ours compare with theirs. Activation checkpointing recomputes the forward, but MFU
counts the *model's* FLOPs, not the hardware's, so recomputation is not added (that would be
HFU).

MFU = achieved FLOP/s / peak FLOP/s = tokens_per_s * flops_per_token / peak, per device.
Peak comes from `GPU_PEAKS` (vendor datasheets, dense, no 2:4 sparsity) or, on CPU, from a
short matrix-product measurement (`measure_cpu_peak`): a CPU has no datasheet number we can
look up reliably, so its "peak" is what a large matmul achieves on the threads we have. An
unknown GPU gets no peak, and MFU is reported as "n/a" rather than a wrong number.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional

import torch

from andy_dist.config import ModelConfig

TFLOPS = 1e12


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matrix product per token: every block's Linears + the LM head."""
    per_block = (3 + 1 + 2 * cfg.ffn_mult) * cfg.d_model**2  # qkv, proj, ffn fc + out
    return cfg.n_layers * per_block + cfg.d_model * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token at sequence length `seq_len`.

    training: 6 * N_matmul + 12 * L * d * T (forward + backward); forward only: a third of
    that, 2 * N_matmul + 4 * L * d * T. See the module docstring for what is and is not counted.
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    forward = 2 * matmul_params(cfg) + 4 * cfg.n_layers * cfg.d_model * seq_len
    return float(3 * forward if training else forward)


def sequence_flops(cfg: ModelConfig, lengths, training: bool = True) -> float:
    """Model FLOPs of one pass over sequences of these (real, unpadded) lengths.

    Each sequence of length t costs t * flops_per_token(cfg, t): the matmuls scale with t, attention
    with t^2. This is what a training step does, whatever the padding of its micro-batches (padding
    is work the hardware does, not the model: MFU leaves it out).
    """
    import numpy as np

    t = np.asarray(lengths, dtype=np.float64)
    per_token = 2 * matmul_params(cfg) * t.sum() + 4 * cfg.n_layers * cfg.d_model * (t * t).sum()
    return float(3 * per_token if training else per_token)


@dataclass(frozen=True)
class GpuPeak:
    """Dense peak TFLOP/s of one GPU model by matmul dtype (None: no tensor-core path)."""

    bf16: Optional[float]
    fp16: float
    tf32: Optional[float]  # fp32 matmuls when TF32 is allowed
    fp32: float  # plain fp32 (CUDA cores)


# Vendor datasheet figures, dense (the "with sparsity" numbers are halved), fp32 accumulate.
# Order matters: the first pattern that matches the device name wins, so the more specific
# names (PCIe, NVL) come before the plain ones.
GPU_PEAKS: list[tuple[str, str, GpuPeak]] = [
    (r"H200.*NVL", "H200 NVL", GpuPeak(bf16=835.0, fp16=835.0, tf32=417.5, fp32=60.0)),
    (r"H200", "H200 SXM", GpuPeak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    (r"H100.*NVL", "H100 NVL", GpuPeak(bf16=835.0, fp16=835.0, tf32=417.5, fp32=60.0)),
    (r"H100.*PCI", "H100 PCIe", GpuPeak(bf16=756.5, fp16=756.5, tf32=378.0, fp32=51.2)),
    (r"H100", "H100 SXM", GpuPeak(bf16=989.4, fp16=989.4, tf32=494.7, fp32=66.9)),
    (r"A100", "A100", GpuPeak(bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),
    (r"L40S", "L40S", GpuPeak(bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)),
    (r"\bL4\b", "L4", GpuPeak(bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (r"\bA10\b", "A10", GpuPeak(bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    # GeForce cards: the datasheet's "fp16 with fp32 accumulate" rate, which is what PyTorch uses.
    (r"RTX 4090", "RTX 4090", GpuPeak(bf16=165.2, fp16=165.2, tf32=82.6, fp32=82.6)),
    (r"RTX 3090", "RTX 3090", GpuPeak(bf16=71.0, fp16=71.0, tf32=35.6, fp32=35.6)),
    # Volta and Turing have fp16 tensor cores but no bf16 (it runs emulated: no meaningful peak).
    (r"V100.*PCI", "V100 PCIe", GpuPeak(bf16=None, fp16=112.0, tf32=None, fp32=14.0)),
    (r"V100", "V100 SXM2", GpuPeak(bf16=None, fp16=125.0, tf32=None, fp32=15.7)),
    (r"\bT4\b", "T4", GpuPeak(bf16=None, fp16=65.0, tf32=None, fp32=8.1)),
]


def _dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in names:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(names)}")
    return names[dtype]


def lookup_gpu(name: str) -> Optional[tuple[str, GpuPeak]]:
    """(label, peaks) of the first table entry whose pattern matches the CUDA device name."""
    for pattern, label, peak in GPU_PEAKS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return label, peak
    return None


def gpu_peak_flops(name: str, dtype, tf32: bool = False) -> Optional[float]:
    """Dense peak FLOP/s of the GPU called `name` (as torch.cuda.get_device_name reports it).

    None for a GPU not in the table or a dtype it has no fast path for. `tf32`: whether fp32
    matmuls run on TF32 tensor cores (torch.backends.cuda.matmul.allow_tf32).
    """
    found = lookup_gpu(name)
    if found is None:
        return None
    peak = found[1]
    dtype = _dtype(dtype)
    if dtype == torch.bfloat16:
        value = peak.bf16
    elif dtype == torch.float16:
        value = peak.fp16
    else:
        value = peak.tf32 if tf32 and peak.tf32 else peak.fp32
    return None if value is None else value * TFLOPS


@lru_cache(maxsize=None)
def measure_cpu_peak(dtype=torch.float32, seconds: float = 0.3, size: int = 512) -> float:
    """FLOP/s of a square matmul on this CPU with the current thread count (cached per arguments).

    Best of repeated products over about `seconds`, after one warm-up: the best run is the
    closest to what the hardware can do, not disturbed by other processes.
    """
    dtype = _dtype(dtype)
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)  # warm-up: first call allocates and picks kernels
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        runs += 1
    return 2.0 * size**3 / best


def peak_flops(device, dtype) -> Optional[float]:
    """Peak FLOP/s of `device` for matmuls in `dtype`; None when unknown (then MFU is "n/a").

    CUDA: from `GPU_PEAKS` by device name. CPU: measured once by `measure_cpu_peak`.
    """
    device = torch.device(device)
    dtype = _dtype(dtype)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return gpu_peak_flops(name, dtype, tf32=torch.backends.cuda.matmul.allow_tf32)
    if device.type == "cpu":
        # A CPU may multiply faster in fp32 than in bf16 at this size (or the other way round at the
        # sizes training uses): the peak is the best rate measured, so MFU can never pass 100%.
        return max(measure_cpu_peak(dtype, size=1024), measure_cpu_peak(torch.float32, size=1024))
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: Optional[float], n_devices: int = 1) -> Optional[float]:
    """Model FLOPs utilization in [0, 1]-ish; None when the peak is unknown.

    `tokens_per_s` is the total over `n_devices` devices, `peak` the peak of one device.
    """
    if peak is None or peak <= 0 or n_devices <= 0:
        return None
    return tokens_per_s * flops_per_token / (peak * n_devices)


class MfuMeter:
    """Everything MFU needs, resolved once at start-up: the model's FLOPs and the device's peak.

    In training, `meter.utilization(flops_per_s_per_device)` with FLOPs from `meter.step_flops(lengths)`:
    each sample counted at its own length, so attention is neither over- nor under-counted. With a fixed
    `seq_len` (benchmarks of full-length batches), `meter(tokens_per_s_per_device)` does the same in one
    call. Either gives MFU or None (unknown peak). `meter.describe()` is the one line a trainer prints
    so the user can see the formula and the peak it divides by.
    """

    def __init__(self, cfg: ModelConfig, seq_len: Optional[int], device, dtype, peak: Optional[float] = None):
        self.cfg = cfg
        self.device = torch.device(device)
        self.dtype = _dtype(dtype)
        self.seq_len = seq_len
        self.flops_per_token = flops_per_token(cfg, seq_len, training=True) if seq_len else None
        self.peak = peak if peak is not None else peak_flops(self.device, self.dtype)
        if self.device.type == "cuda":
            self.source = f"datasheet, {torch.cuda.get_device_name(self.device)}"
        else:
            self.source = f"measured {self.device.type} matmul"

    def __call__(self, tokens_per_s_per_device: float) -> Optional[float]:
        if self.flops_per_token is None:
            raise ValueError("this meter has no fixed seq_len: use utilization(step_flops(lengths) / seconds)")
        return mfu(tokens_per_s_per_device, self.flops_per_token, self.peak)

    def step_flops(self, lengths) -> float:
        """Training FLOPs of a step over samples of these real lengths (all ranks together)."""
        return sequence_flops(self.cfg, lengths, training=True)

    def utilization(self, flops_per_s_per_device: float) -> Optional[float]:
        return mfu(flops_per_s_per_device, 1.0, self.peak)

    def describe(self) -> str:
        if self.flops_per_token is None:
            flops = (f"{6 * matmul_params(self.cfg) / 1e6:.1f} MFLOP/token + 12LdT (6N + 12LdT, T = each "
                     f"sample's own length)")
        else:
            flops = f"{self.flops_per_token / 1e6:.1f} MFLOP/token (6N + 12LdT, T={self.seq_len})"
        if self.peak is None:
            return f"MFU: {flops}; peak unknown for this device ({self.source}), MFU logged as n/a"
        dtype = str(self.dtype).removeprefix("torch.")
        return f"MFU: {flops} / peak {self.peak / TFLOPS:.3g} TFLOP/s {dtype} ({self.source})"
