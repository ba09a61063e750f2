"""Generation: tokens/s vs transformers' GPT-2 generate; int8 vs fp32 perplexity and file size.

    python tools/bench.py generate                      # CPU: speed, cold CLI vs transformers, int8 quality
    python tools/bench.py generate --device cuda        # bf16 and int8 tokens/s at batch 1, 8, 64, by decode mode
    python tools/bench.py generate --skip-quality --skip-cold --batch-sizes 1 --new-tokens 32   # quick
    python tools/bench.py generate --skip-quality --skip-cold --threads 2 --batch-sizes 1,8 --repeats 5
    python tools/bench.py generate --device cpu --by-mode --compile-modes off,inductor   # the CUDA table, on CPU

Speed (warm): the medium shape with random weights (speed does not depend on the values) against a
transformers GPT2LMHeadModel of the same width, depth, heads and vocabulary (n_positions 512), both
greedy (the same sampling settings), the same prompts of 16 tokens, the same torch thread count,
one warm-up each. Cold CLI: tools/generate.py in a fresh process per run, sampled as a user runs it,
against transformers in a fresh process (tools/benchmarks/_generate_cold.py). Sampling: top-p per step
against a full sort (tools/benchmarks/_sampling_speed.py). By mode (CUDA): each
decode mode of andy_dist/infer/decode.py, bf16 and int8, with the first call's seconds (compile or
capture). Quality: a tiny model trained for a few hundred steps in plain PyTorch on tinyshakespeare
(or the built-in stdlib corpus), exported fp32 and int8, perplexity on held-out text.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch

from andy_dist import UserError
from andy_dist.config import model_config
from andy_dist.infer.decode import decoder_for
from andy_dist.infer.generate import generate
from andy_dist.infer.token_sampling import SamplingConfig
from andy_dist.model import AndyLM

GREEDY = SamplingConfig(temperature=0)
PROMPT_LEN = 16


def add_arguments(parser) -> None:
    parser.add_argument("--device", default="cpu", help="cpu (vs transformers) or cuda (bf16 and int8)")
    parser.add_argument("--size", default="medium")
    parser.add_argument("--batch-sizes", default=None, help="comma list (cpu: 1,8; cuda: 1,8,64)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both sides (default: all)")
    parser.add_argument("--skip-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--skip-quality", action="store_true", help="skip the int8 perplexity / file size part")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--skip-shed", action="store_true", help="skip the finished-rows-leave-the-batch part")
    parser.add_argument("--skip-cold", action="store_true", help="skip the cold tools/generate.py runs (CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="cold runs per batch size and side")
    parser.add_argument("--compile-modes", default=None,
                        help="decode modes to time: a comma list of off, inductor, cudagraph "
                             "(default cpu: off; cuda: off,cudagraph)")
    parser.add_argument("--by-mode", action="store_true", help="on CPU, run the CUDA section's table instead")


def _int8_copy(model: AndyLM, kernel: str = "auto") -> AndyLM:
    """The model as the int8 export would load it (same transform, no file round trip)."""
    from andy_dist.infer.model_file import build_model
    from andy_dist.infer.quantize import SCHEME, quantize_state_dict

    info = {"model_config": model.cfg.to_dict(),
            "quantization": {"scheme": SCHEME, "float_dtype": "fp32", "embeddings_quantized": True}}
    device = model.embed.weight.device
    tensors = quantize_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()},
                                  tied=model.cfg.tie_embeddings)
    return build_model(tensors, info, device=device, int8_kernel=kernel)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _time_ours(model, prompts, new_tokens, device, mode="off") -> tuple[float, float]:
    """(tokens/s warm, seconds of the first call: warm-up, compilation or capture included)."""
    start = time.perf_counter()
    warm_up = 4 if mode == "off" else new_tokens  # a compiled step warms up on the shapes of the run
    generate(model, prompts, warm_up, GREEDY, eos_id=-1, compile=mode)
    _sync(device)
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = generate(model, prompts, new_tokens, GREEDY, eos_id=-1, compile=mode)
    _sync(device)
    assert all(len(r) == new_tokens for r in out)
    return len(prompts) * new_tokens / (time.perf_counter() - start), first


def _timed(model, prompts, new_tokens, device, mode) -> tuple:
    """_time_ours, or the reason the mode cannot run this model, twice, in place of the figures."""
    if mode == "inductor":
        torch._dynamo.reset()  # one model's recompilations must not count against the next one's limit
    try:
        return _time_ours(model, prompts, new_tokens, device, mode)
    except UserError as err:
        return (f"n/a: {err}",) * 2


def _round(value, digits: int):
    return round(value, digits) if isinstance(value, float) else value


def _modes(args, device: str) -> list[str]:
    default = "off,cudagraph" if device.startswith("cuda") else "off"
    return [m for m in (args.compile_modes or default).split(",") if device.startswith("cuda") or m != "cudagraph"]


def _hf_model(cfg):
    try:
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError:
        return None
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                        n_positions=512, bos_token_id=2, eos_token_id=3, pad_token_id=0)
    return GPT2LMHeadModel(hf_cfg).eval()


def _time_hf(model, prompts, new_tokens) -> float:
    ids = torch.tensor(prompts)
    kwargs = dict(do_sample=False, min_new_tokens=new_tokens, pad_token_id=0, attention_mask=torch.ones_like(ids))
    with torch.inference_mode():
        model.generate(ids[:, :4], max_new_tokens=4, **kwargs | {"min_new_tokens": 4,
                                                                  "attention_mask": torch.ones_like(ids[:, :4])})
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new_tokens, **kwargs)
    assert out.shape[1] == PROMPT_LEN + new_tokens
    return len(prompts) * new_tokens / (time.perf_counter() - start)


def speed_cpu(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.size, dropout=0.0)
    torch.manual_seed(0)
    fp32 = AndyLM(cfg).eval()
    int8 = _int8_copy(fp32)
    hf = None if args.skip_hf else _hf_model(cfg)
    figures = {"shape": cfg.to_dict(), "threads": torch.get_num_threads(), "new_tokens": args.new_tokens,
               "prompt_tokens": PROMPT_LEN, "sampling": "greedy (both)"}
    if hf is None and not args.skip_hf:
        figures["transformers"] = "missing: pip install transformers (the 'bench' extra) for the baseline"
    gen = torch.Generator().manual_seed(1)
    for batch in [int(b) for b in (args.batch_sizes or "1,8").split(",")]:
        prompts = torch.randint(4, cfg.vocab_size, (batch, PROMPT_LEN), generator=gen).tolist()
        row = {}
        for mode in _modes(args, "cpu"):
            suffix = "" if mode == "off" else f"_{mode}"
            for name, model in (("fp32", fp32), ("int8", int8)):
                row[f"ours_{name}{suffix}_tok_s"], first = _timed(model, prompts, args.new_tokens, "cpu", mode)
                if mode != "off":
                    row[f"ours_{name}{suffix}_first_call_s"] = first
        if hf is not None:
            row["hf_fp32_tok_s"] = _time_hf(hf, prompts, args.new_tokens)
            row["ratio_int8_vs_hf"] = row["ours_int8_tok_s"] / row["hf_fp32_tok_s"]
            row["ratio_fp32_vs_hf"] = row["ours_fp32_tok_s"] / row["hf_fp32_tok_s"]
        figures[f"batch_{batch}"] = {k: _round(v, 2) for k, v in row.items()}
        print(f"batch {batch}: {figures[f'batch_{batch}']}", flush=True)
    return figures


def speed_by_mode(args) -> dict:
    """bf16 (fp32 on CPU) and int8, each decode mode: warm tokens/s and the first call's seconds."""
    device = args.device
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = model_config(args.size, dropout=0.0)
    torch.manual_seed(0)
    base = AndyLM(cfg).eval()
    int8, int8_fused = _int8_copy(base), _int8_copy(base, kernel="dequant")  # before the move: .to is in place
    models = {"bf16" if cuda else "fp32": base.to(device=device, dtype=dtype),
              "int8": int8.to(device=device, dtype=dtype), "int8_dequant": int8_fused.to(device=device, dtype=dtype)}
    modes = _modes(args, device)
    figures = {"device": torch.cuda.get_device_name() if cuda else device, "shape": cfg.to_dict(),
               "new_tokens": args.new_tokens, "modes": modes,
               "int8_kernel": sorted({m.prepare(dtype) for m in models["int8"].modules() if hasattr(m, "prepare")}),
               "int8_dequant": "int8 with kernel 'dequant' (fused into the matmul by Inductor), timed under inductor "
                               "in place of int8 (kernel 'dense' compiles to bf16's graph)"}
    gen = torch.Generator().manual_seed(1)
    for batch in [int(b) for b in (args.batch_sizes or "1,8,64").split(",")]:
        prompts = torch.randint(4, cfg.vocab_size, (batch, PROMPT_LEN), generator=gen).tolist()
        row, first = {}, {}
        for name, model in models.items():
            # Under inductor, int8 is timed with the kernel Inductor fuses ("dequant"): "dense" is bf16's graph.
            for mode in [m for m in modes if not name.startswith("int8") or (m == "inductor") == (name != "int8")]:
                tok_s, first_s = _timed(model, prompts, args.new_tokens, device, mode)
                row[f"{name}_{mode}"], first[f"{name}_{mode}"] = _round(tok_s, 1), _round(first_s, 2)
        figures[f"batch_{batch}_tok_s"], figures[f"batch_{batch}_first_call_s"] = row, first
        print(f"batch {batch}: {row} (first calls, s: {first})", flush=True)
    return figures


def shedding(args) -> dict:
    """Rows that stop early (at EOS, or at their length limit) leave the batch: half the rows of a batch
    stop after 1/8 of the tokens; the same batch with shedding off (rows kept, fed PAD) is the baseline.
    Row budgets stand in for EOS here, because a random model never emits it; it is the same code path."""
    import andy_dist.infer.generate as gen_module

    device = args.device
    batch = 16 if device == "cpu" else 64
    cfg = model_config(args.size, dropout=0.0)
    torch.manual_seed(0)
    model = AndyLM(cfg).eval().to(device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16)
    prompts = torch.randint(4, cfg.vocab_size, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(2)).tolist()
    budgets = [args.new_tokens // 8] * (batch // 2) + [args.new_tokens] * (batch - batch // 2)

    def timed(shed_at: float) -> tuple[float, list]:
        gen_module.SHED_FINISHED_AT = shed_at
        _sync(device)
        start = time.perf_counter()
        out, _ = gen_module._generate_batch([decoder_for(model)], prompts, budgets, GREEDY, -1, None, [0] * batch)
        _sync(device)
        return time.perf_counter() - start, out

    default = gen_module.SHED_FINISHED_AT
    try:
        timed(default)  # warm-up
        kept, kept_out = timed(2.0)
        shed, shed_out = timed(default)
    finally:
        gen_module.SHED_FINISHED_AT = default
    assert kept_out == shed_out, "shedding finished rows changed the tokens of the others"
    figures = {"batch": batch, "rows_stopping_early": batch // 2, "early_stop_tokens": args.new_tokens // 8,
               "new_tokens": args.new_tokens, "kept_s": round(kept, 3), "shed_s": round(shed, 3),
               "speedup": round(kept / shed, 3)}
    print(f"shedding finished rows: {figures}", flush=True)
    return figures


def _corpus_text() -> tuple[str, str]:
    shakespeare = Path(__file__).resolve().parents[2].parent / "shared" / "corpora" / "tinyshakespeare.txt"
    if shakespeare.exists():
        return shakespeare.read_text(encoding="utf-8"), "tinyshakespeare"
    from andy_dist.data.corpus import read_documents, write_default_corpus

    path = write_default_corpus(Path(tempfile.mkdtemp()) / "stdlib.jsonl", max_bytes=1_000_000)
    return "\n".join(d.text for d in read_documents([str(path)])), "stdlib"


def quality(args) -> dict:
    """Train a tiny model briefly, export fp32 / int8 / int8 with float embeddings, compare."""
    from andy_dist.data.corpus import Document
    from andy_dist.data.tokenizer import Tokenizer, train_tokenizer
    from andy_dist.infer.evaluation import evaluate_batches, text_batches
    from andy_dist.infer.model_file import load_model_file, save_model_file

    text, name = _corpus_text()
    cut = int(len(text) * 0.9)
    train_text, held_text = text[:cut], text[cut:]
    work = Path(tempfile.mkdtemp())
    tokenizer = Tokenizer.from_file(train_tokenizer([Document("train", train_text)], 2000, work))
    cfg = model_config("tiny", vocab_size=tokenizer.vocab_size, dropout=0.0)
    ids = torch.tensor(tokenizer.encode(train_text))
    torch.manual_seed(0)
    model = AndyLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    seq, batch = 128, 16
    from tqdm import tqdm

    for _ in tqdm(range(args.train_steps), desc="train tiny", mininterval=2.0):
        starts = torch.randint(0, len(ids) - seq - 1, (batch,))
        x = torch.stack([ids[s : s + seq] for s in starts])
        y = torch.stack([ids[s + 1 : s + seq + 1] for s in starts])
        out = model(x, targets=y)
        loss = out.loss_sum / out.target_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.eval().state_dict()
    held = [2] + tokenizer.encode(held_text[:60_000]) + [3]
    held_bytes = len(held_text[:60_000].encode())
    figures = {"corpus": name, "train_steps": args.train_steps, "final_train_loss": round(float(loss), 4)}
    for label, dtype, float_embed in [("fp32", "fp32", False), ("int8", "int8", False),
                                      ("int8_float_embeddings", "int8", True)]:
        path = save_model_file(work / f"{label}.andy", state, cfg, tokenizer, dtype=dtype,
                               quantize_embeddings=not float_embed)
        loaded, _, _ = load_model_file(path)
        result = evaluate_batches(loaded, text_batches(held, cfg.max_seq_len), held_bytes)
        figures[label] = {"perplexity": round(result["perplexity"], 4),
                          "bits_per_byte": round(result["bits_per_byte"], 4), "file_bytes": path.stat().st_size}
    base = figures["fp32"]
    for label in ("int8", "int8_float_embeddings"):
        figures[label]["ppl_vs_fp32"] = round(figures[label]["perplexity"] / base["perplexity"], 4)
        figures[label]["size_vs_fp32"] = round(figures[label]["file_bytes"] / base["file_bytes"], 4)
    # The medium shape's file sizes follow from parameter counts (no training needed).
    medium = model_config("medium")
    emb = 2 * medium.vocab_size * medium.d_model  # embedding + LM head; scales and norms are negligible
    blocks = medium.n_layers * (12 * medium.d_model ** 2 + 13 * medium.d_model)
    figures["medium_size_estimate"] = {"fp32_bytes": 4 * (emb + blocks), "int8_bytes": emb + blocks,
                                       "ratio": round((emb + blocks) / (4 * (emb + blocks)), 3)}
    return figures


def run(args) -> dict:
    figures: dict = {}
    if args.device == "cpu" and not args.by_mode:
        figures["speed_cpu"] = speed_cpu(args)
        from ._sampling_speed import sampling_speed

        figures["sampling"] = sampling_speed(model_config(args.size).vocab_size,
                                             [int(b) for b in (args.batch_sizes or "1,8").split(",")])
        if not args.skip_cold:
            from ._generate_cold import cold_cli

            batches = [int(b) for b in (args.batch_sizes or "1,8").split(",")]
            figures["cold_cli"] = cold_cli(args.size, batches, [args.threads or torch.get_num_threads()],
                                           args.new_tokens, args.repeats, with_hf=not args.skip_hf)
        if not args.skip_quality:
            figures["quality"] = quality(args)
    else:
        figures["speed_gpu" if args.device.startswith("cuda") else "speed_by_mode"] = speed_by_mode(args)
    if not args.skip_shed:
        figures["shedding"] = shedding(args)
    return figures
