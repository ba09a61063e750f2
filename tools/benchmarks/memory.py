"""The vocabulary's cost: peak memory and time of the LM head's loss, full logits against chunks, and the
step time of padded against unpadded vocabulary rows (issue 12).

    python tools/bench.py memory                                    # CPU, medium head at 4 x 512 tokens
    python tools/bench.py memory --device cuda --dtype bf16 --batch 16 --seq-len 512 --step-sizes medium

head: loss + backward of hidden states (batch x seq_len, d) through the head alone, as training runs it:
  full            logits (B*T, V) of the unpadded head, then F.cross_entropy in fp32 (the path before the change)
  chunked_N       `andy_dist.lm_head.linear_cross_entropy_sum` over the padded rows, N tokens a chunk
  peak_mb: the rise of peak memory over what the inputs hold, during one loss + backward (gradients
  included), each case in a fresh process so that a peak is its own: on CPU the peak resident set
  (ru_maxrss) over the resident set before; on CUDA torch.cuda.max_memory_allocated over the allocated
  bytes before (and the reserved peak beside it).
step: one training step (forward, backward, AdamW) of the whole model at --step-batch x --step-seq-len,
  padded (vocab_pad_multiple 128) and unpadded rows, chunked and full loss.
Times (ms) are the best of --reps, the cases of a section taking turns in one process: on a shared machine
the least disturbed run is the best estimate, and turns expose every case to the same load. Ratios are
against `full` (head) and against unpadded + full (step), measured in the same run.
"""

from __future__ import annotations

import concurrent.futures as futures
import multiprocessing
import resource
import time

import torch

PAD = 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--size", default="medium", help="the shape whose head is measured")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--chunks", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--reps", type=int, default=3, help="timed runs per case; 0: peak memory only")
    parser.add_argument("--step-sizes", nargs="*", default=["tiny", "medium"], help="sizes of the step section")
    parser.add_argument("--step-batch", type=int, default=4)
    parser.add_argument("--step-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_of_turns(cases: dict, device: torch.device, reps: int) -> dict[str, float]:
    """ms of each callable, the best of `reps`, the cases taking turns (after one untimed call each)."""
    for fn in cases.values():
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], 1000 * (time.perf_counter() - start))
    return {name: round(ms, 1) for name, ms in best.items()}


def _head_inputs(device: torch.device, dtype: torch.dtype, size: str, tokens: int):
    """(config, hidden, padded weight, targets); filled in place, since a temporary would raise the peak."""
    from andy_dist.config import model_config

    cfg = model_config(size).replace(vocab_pad_multiple=PAD)
    generator = torch.Generator(device=device).manual_seed(0)
    hidden = torch.empty(tokens, cfg.d_model, device=device, dtype=dtype).normal_(generator=generator)
    weight = torch.empty(cfg.padded_vocab_size, cfg.d_model, device=device, dtype=dtype)
    weight.normal_(0.0, 0.02, generator=generator)
    targets = torch.randint(4, cfg.vocab_size, (tokens,), device=device, generator=generator)
    return cfg, hidden.requires_grad_(), weight.requires_grad_(), targets


def _head_step(cfg, hidden, weight, targets, chunk: int):
    """One loss + backward; chunk 0: the full logits of the unpadded rows (a view of the padded weight)."""
    from andy_dist.lm_head import linear_cross_entropy_sum, token_loss

    def run():
        if chunk:
            loss = linear_cross_entropy_sum(hidden, weight, targets, cfg.vocab_size, chunk)
        else:
            loss, _ = token_loss(hidden @ weight[: cfg.vocab_size].T, targets)
        loss.backward()
        hidden.grad = weight.grad = None

    return run


def head_peak(device: str, dtype: str, size: str, tokens: int, chunk: int, threads) -> dict:
    """Peak memory of one loss + backward, in a process of its own."""
    from andy_dist.train.metrics import memory_gb

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    run = _head_step(*_head_inputs(device, DTYPES[dtype], size, tokens), chunk)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    before = memory_gb(device) * 1e9  # in use now: the resident set, or CUDA's allocated bytes
    run()
    _sync(device)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {"peak_mb": round((peak - before) / 2**20, 1),
                "reserved_peak_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: kilobytes
    return {"peak_mb": round((peak - before) / 2**20, 1)}


def head_times(device: str, dtype: str, size: str, tokens: int, chunks: list[int], reps: int, threads) -> dict:
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    inputs = _head_inputs(device, DTYPES[dtype], size, tokens)
    cases = {("full" if c == 0 else f"chunked_{c}"): _head_step(*inputs, c) for c in [0, *chunks]}
    return _best_of_turns(cases, device, reps)


def step_times(device: str, dtype: str, size: str, batch: int, seq_len: int, reps: int, threads) -> dict:
    """ms per training step of the whole model: padded or not, chunked loss or full logits, taking turns."""
    from andy_dist.config import model_config
    from andy_dist.model import AndyLM, token_loss

    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device)
    ids = torch.randint(4, model_config(size).vocab_size, (batch, seq_len + 1), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")

    def case(padded: bool, chunked: bool):
        torch.manual_seed(0)
        cfg = model_config(size, max_seq_len=seq_len, dropout=0.0).replace(vocab_pad_multiple=PAD if padded else 1)
        model = AndyLM(cfg).to(device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step():
            with autocast:
                if chunked:
                    loss = model(ids[:, :-1], targets=ids[:, 1:]).loss_sum
                else:
                    loss, _ = token_loss(model(ids[:, :-1]).logits, ids[:, 1:])
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    cases = {f"{'padded' if p else 'unpadded'}_{'chunked' if c else 'full'}": case(p, c)
             for p in (False, True) for c in (False, True)}
    return _best_of_turns(cases, device, reps)


def _in_fresh_process(fn, *args):
    context = multiprocessing.get_context("spawn")
    with futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(fn, *args).result()


def run(args) -> dict:
    from andy_dist.config import model_config

    cfg = model_config(args.size).replace(vocab_pad_multiple=PAD)
    tokens, common = args.batch * args.seq_len, (args.device, args.dtype)
    ms = (_in_fresh_process(head_times, *common, args.size, tokens, args.chunks, args.reps, args.threads)
          if args.reps else {})
    head = {}
    for name, chunk in [("full", 0)] + [(f"chunked_{c}", c) for c in args.chunks]:
        head[name] = {**_in_fresh_process(head_peak, *common, args.size, tokens, chunk, args.threads),
                      "ms": ms.get(name)}
        print(f"head {name}: {head[name]}", flush=True)
    for figures in head.values():
        figures["peak_over_full"] = round(figures["peak_mb"] / max(head["full"]["peak_mb"], 0.1), 3)
        figures["time_over_full"] = round(figures["ms"] / head["full"]["ms"], 3) if ms else None
    steps = {}
    for size in args.step_sizes if args.reps else ():
        ms = _in_fresh_process(step_times, *common, size, args.step_batch, args.step_seq_len, args.reps, args.threads)
        steps[size] = {"ms": ms, "over_unpadded_full": {k: round(v / ms["unpadded_full"], 3) for k, v in ms.items()}}
        print(f"step {size}: {steps[size]}", flush=True)
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    return {"device": device, "torch": torch.__version__, "dtype": args.dtype, "threads": args.threads,
            "head": {"size": args.size, "tokens": tokens, "vocab": cfg.vocab_size, "padded_rows": cfg.padded_vocab_size,
                     "d_model": cfg.d_model, "cases": head},
            "step": {"batch": args.step_batch, "seq_len": args.step_seq_len, "sizes": steps}}
