"""MFU of plain training steps (forward, backward, AdamW) of each model size on one device.

    python tools/bench.py mfu --device cuda --dtype bf16 --sizes tiny small medium
    python tools/bench.py mfu --device cpu --dtype fp32 --sizes tiny --batch 8 --seq-len 128

Tokens/s is timed over --steps steps after --warmup steps (CUDA synchronized), then divided
into MFU with andy_dist.train.flops (6N + 12LdT per token over the device's peak). The FLOPs per
token are also checked against torch.utils.flop_counter on the same device, so the figure
rests on a counted number, not only on the formula.
"""

from __future__ import annotations

import time

import torch


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--sizes", nargs="+", default=["tiny", "small", "medium"])
    parser.add_argument("--batch", type=int, nargs="+", default=None,
                        help="sequences per step (default: the top of each size's global batch range)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def counted_flops_per_token(model, batch: torch.Tensor) -> float:
    """FLOPs per token of one forward + backward as PyTorch counts them (math attention, so the
    attention products are counted on any device)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with sdpa_kernel(SDPBackend.MATH), counter:
        out = model(batch[:1, :-1], targets=batch[:1, 1:])
        out.loss_sum.backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / (batch.shape[1] - 1)


def measure(size: str, batch_size: int, args) -> dict:
    from andy_dist.config import GLOBAL_BATCH_RANGE, model_config
    from andy_dist.model import AndyLM
    from andy_dist.train.flops import MfuMeter

    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    cfg = model_config(size, max_seq_len=args.seq_len)
    model = AndyLM(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = torch.randint(4, cfg.vocab_size, (batch_size, args.seq_len + 1), device=device)
    meter = MfuMeter(cfg, args.seq_len, device, dtype)
    # Counted on the unpadded shape: MFU counts the model's FLOPs, not the products of the padded vocabulary
    # rows (0.1% of medium's, 1.1% of tiny's), which are overhead like any other.
    counted = counted_flops_per_token(AndyLM(cfg.replace(vocab_pad_multiple=1)).to(device), batch)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            out = model(batch[:, :-1], targets=batch[:, 1:])
        (out.loss_sum / out.target_tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    _sync(device)
    seconds = time.perf_counter() - start
    tokens_per_s = batch_size * args.seq_len * args.steps / seconds
    value = meter(tokens_per_s)
    low, high = GLOBAL_BATCH_RANGE[size]
    return {
        "size": size, "batch": batch_size, "seq_len": args.seq_len, "dtype": args.dtype,
        "params": model.num_parameters(), "in_global_batch_range": low <= batch_size <= high,
        "flops_per_token": meter.flops_per_token, "counted_flops_per_token": counted,
        "formula_vs_counter": meter.flops_per_token / counted,
        "step_ms": 1000 * seconds / args.steps, "tokens_per_s": round(tokens_per_s),
        "peak_tflops": None if meter.peak is None else meter.peak / 1e12,
        "mfu": "n/a" if value is None else round(value, 4), "peak_source": meter.describe(),
    }


def run(args) -> dict:
    from andy_dist.config import GLOBAL_BATCH_RANGE

    device = torch.device(args.device)
    results = []
    for size in args.sizes:
        for batch_size in args.batch or [GLOBAL_BATCH_RANGE[size][1]]:
            results.append(measure(size, batch_size, args))
            print(results[-1], flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    return {"device": name, "torch": torch.__version__, "results": results}
