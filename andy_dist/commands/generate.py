"""Generate text from an exported model file (KV-cached, batched, sampled).

    andy-generate model.andy --prompt "To be" --prompt "Once" --max-new-tokens 64 \\
        --temperature 0.8 --top-k 50 --top-p 0.95 --repetition-penalty 1.1 --seed 1      (or: python tools/generate.py)
    andy-generate model.andy --prompts-file prompts.txt --batch-size 8   # one prompt per line
    andy-generate a.andy --ensemble b.andy --prompt "x"   # average the models' log-probabilities

Sampling order and the repetition penalty's rules: see andy_dist/infer/token_sampling.py.
"""

import argparse
import sys
import time

from andy_dist.cli import run_tool


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a .andy file written by tools/export.py")
    parser.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    parser.add_argument("--prompts-file", help="a UTF-8 file with one prompt per line")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=0, help="0 = off")
    parser.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, help="1 = off")
    parser.add_argument("--no-penalize-prompt", action="store_true",
                        help="the repetition penalty counts only generated tokens, not the prompt's")
    parser.add_argument("--seed", type=int, help="make the run repeatable")
    parser.add_argument("--batch-size", type=int, help="prompts per forward pass (default: all)")
    parser.add_argument("--ensemble", action="append", default=[], metavar="OTHER.andy",
                        help="another model with the same tokenizer to average with (repeatable)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--compile", default="auto", choices=("auto", "off", "inductor", "cudagraph"),
                        help="how each decode step runs: eager (off), torch.compile (inductor: seconds to a minute "
                             "to compile first), a CUDA graph (cudagraph), or auto: cudagraph on CUDA, off on CPU")
    return parser


def _prompts(args) -> list[str]:
    from andy_dist import UserError
    from andy_dist.cli import read_text_file

    prompts = list(args.prompt)
    if args.prompts_file:
        text = read_text_file(args.prompts_file, "--prompts-file")
        prompts += [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"--prompts-file {args.prompts_file} holds no prompt (one per non-empty line)")
    if not prompts:
        raise UserError("give at least one --prompt or a --prompts-file")
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {args.batch_size}")
    return prompts


def main(argv=None) -> int:
    from andy_dist import UserError
    from andy_dist.cli import resolve_device
    from andy_dist.infer.generate import generate
    from andy_dist.infer.model_file import load_model_file
    from andy_dist.infer.token_sampling import SamplingConfig

    args = build_parser().parse_args(argv)
    prompts = _prompts(args)
    sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.repetition_penalty,
                              penalize_prompt=not args.no_penalize_prompt)
    device = resolve_device(args.device)
    model, tokenizer, _ = load_model_file(args.model, device=device)
    limit = model.cfg.max_seq_len - 1  # a one-token prompt (BOS) leaves this many positions
    if args.max_new_tokens > limit:
        raise UserError(f"--max-new-tokens {args.max_new_tokens} is more than {args.model} can generate: "
                        f"its context is {model.cfg.max_seq_len} tokens, so at most {limit} (prompt included)")
    models = [model]
    for other in args.ensemble:
        member, member_tok, _ = load_model_file(other, device=device)
        if member_tok.sha256 != tokenizer.sha256:
            raise UserError(f"--ensemble {other} uses another tokenizer than {args.model}; members must share one")
        models.append(member)
    start = time.perf_counter()
    ids = tokenizer.encode_batch(prompts, bos=True)
    new = generate(models, ids, args.max_new_tokens, sampling, seed=args.seed, batch_size=args.batch_size,
                   compile=args.compile, valid_vocab=tokenizer.vocab_size)
    texts = [tokenizer.decode(tokens) for tokens in new]
    seconds = time.perf_counter() - start
    for prompt, text in zip(prompts, texts):
        print(f"=== {prompt}\n{prompt}{text}\n")
    tokens = sum(len(t) for t in new)
    print(f"[{len(prompts)} prompts, {tokens} new tokens in {seconds:.2f}s: {tokens / seconds:.1f} tokens/s]",
          file=sys.stderr)
    return 0


def run() -> None:
    run_tool(main)
