"""FLOPs per token against PyTorch's own FLOP counter; peak table; MFU n/a when the peak is unknown."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from andy_dist.config import SIZES
from andy_dist.model import AndyLM
from andy_dist.train.flops import (
    GPU_PEAKS,
    MfuMeter,
    flops_per_token,
    gpu_peak_flops,
    lookup_gpu,
    matmul_params,
    measure_cpu_peak,
    mfu,
    peak_flops,
    sequence_flops,
)

T = 128


def counted_flops(model: AndyLM, seq_len: int, backward: bool) -> tuple[int, int]:
    """(all FLOPs, attention-score FLOPs) PyTorch counts for one sequence of `seq_len` tokens.

    The math SDPA backend is forced because the CPU's fused attention kernel has no FLOP
    formula registered in torch.utils.flop_counter (it would count as 0); the math backend
    runs the same products as bmm, which are counted, forward and backward.
    """
    ids = torch.randint(4, model.cfg.vocab_size, (1, seq_len))
    counter = FlopCounterMode(display=False)
    # Without backward, no gradient is wanted: the chunked loss would otherwise form its gradients in forward.
    with sdpa_kernel(SDPBackend.MATH), counter, torch.set_grad_enabled(backward):
        out = model(ids, targets=ids)
        if backward:
            out.loss_sum.backward()
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    return counter.get_total_flops(), by_op.get("aten.bmm", 0)


@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_training_flops_match_pytorch_counter(size):
    torch.manual_seed(0)
    cfg = SIZES[size].replace(vocab_pad_multiple=1)  # MFU counts the model's FLOPs, not the padded rows' products
    model = AndyLM(cfg)
    total, attention = counted_flops(model, T, backward=True)
    analytic = flops_per_token(cfg, T, training=True) * T
    assert abs(analytic - total) / total < 0.05, (size, analytic, total)  # the bound
    assert analytic == pytest.approx(total, rel=1e-3)  # in fact exact: every counted product is in the formula
    assert attention == 12 * cfg.n_layers * cfg.d_model * T * T  # the attention term on its own


def test_a_batch_of_mixed_lengths_counts_each_sample_at_its_own_length():
    """What a training step's MFU divides: the FLOPs PyTorch counts for each sample at its real length."""
    torch.manual_seed(0)
    cfg = SIZES["tiny"].replace(vocab_size=2000, vocab_pad_multiple=1)  # MFU counts the logical vocabulary
    model = AndyLM(cfg)
    lengths = [7, 64, 19, 128]
    counted = sum(counted_flops(model, t, backward=True)[0] for t in lengths)
    assert sequence_flops(cfg, lengths) == pytest.approx(counted, rel=1e-3)
    assert MfuMeter(cfg, None, "cpu", "fp32", peak=1e12).step_flops(lengths) == sequence_flops(cfg, lengths)
    assert sequence_flops(cfg, lengths) < sum(lengths) * flops_per_token(cfg, max(lengths))  # not at the longest


def test_forward_only_is_a_third_and_tied_head_still_counts():
    cfg = SIZES["tiny"].replace(tie_embeddings=True, vocab_pad_multiple=1)
    total, _ = counted_flops(AndyLM(cfg), 64, backward=False)
    assert flops_per_token(cfg, 64, training=False) * 64 == pytest.approx(total, rel=1e-3)
    assert flops_per_token(cfg, 64, training=True) == 3 * flops_per_token(cfg, 64, training=False)
    assert matmul_params(cfg) == 2 * 12 * 128**2 + 128 * 10_000


@pytest.mark.parametrize(
    "name,label",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200 SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA A100-PCIE-40GB", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 3090", "RTX 3090"),
        ("Tesla V100-SXM2-16GB", "V100 SXM2"),
        ("Tesla V100-PCIE-32GB", "V100 PCIe"),
    ],
)
def test_known_gpu_names(name, label):
    assert lookup_gpu(name)[0] == label


def test_peak_by_dtype():
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", torch.bfloat16) == 312e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5e12
    assert gpu_peak_flops("NVIDIA A100-SXM4-80GB", "fp32", tf32=True) == 156e12
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(989.4e12)
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "fp16") == 125e12
    assert gpu_peak_flops("Tesla V100-SXM2-16GB", "bf16") is None  # no bf16 tensor cores: no honest peak
    for _, _, peak in GPU_PEAKS:  # dense figures, so fp16 never exceeds a plausible dense Hopper peak
        assert peak.fp16 <= 1000 and peak.fp32 <= peak.fp16


def test_unknown_device_gives_na():
    assert gpu_peak_flops("Imaginary Accelerator 9000", torch.bfloat16) is None
    assert peak_flops("meta", torch.float32) is None
    assert mfu(10_000.0, 1e9, None) is None
    meter = MfuMeter(SIZES["tiny"], 128, "meta", "bf16")
    assert meter(50_000.0) is None and "n/a" in meter.describe()


def test_mfu_arithmetic():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    assert mfu(2000.0, 1e9, 1e13, n_devices=2) == pytest.approx(0.1)


def test_cpu_peak_is_measured_once_and_plausible():
    peak = measure_cpu_peak(torch.float32, seconds=0.05, size=256)
    assert 1e8 < peak < 1e13  # somewhere between a slow core and a big server
    assert measure_cpu_peak(torch.float32, seconds=0.05, size=256) == peak  # cached
    meter = MfuMeter(SIZES["tiny"], 128, "cpu", torch.float32, peak=peak)
    assert meter(1000.0) == pytest.approx(1000.0 * flops_per_token(SIZES["tiny"], 128) / peak)
    assert "measured cpu matmul" in meter.describe()


@pytest.mark.gpu
def test_gpu_peak_from_the_table():
    name = torch.cuda.get_device_name(0)
    assert peak_flops("cuda", torch.bfloat16) == gpu_peak_flops(name, torch.bfloat16)
    assert lookup_gpu(name) is not None, f"{name} is not in GPU_PEAKS"
