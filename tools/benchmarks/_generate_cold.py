"""Generation as a user runs it: tools/generate.py cold, against transformers' generate cold.

Each measurement is a fresh process on each side, run in turns (ours, theirs, ours, ...) so that a
busy machine slows both alike; the ratio of a pair is what counts, and the spread over repeats shows
the noise. The settings of issue 12: int8 model file, temperature 0.8, top-k 50, top-p 0.9,
repetition penalty 1.1, 128 new tokens, the same prompt token ids on both sides.

Ours: `tools/generate.py MODEL --prompts-file F ...` on an int8 file of the shape (random weights; a
SentencePiece tokenizer of the shape's vocabulary trained on the stdlib corpus, seconds); tokens/s is
what the tool prints for its one generation call (load excluded), wall is the whole process.
Theirs (`python -m tools.benchmarks._generate_cold hf ...`): GPT2LMHeadModel of the same width,
depth, heads and vocabulary, fp32, random weights; tokens/s of its first `generate` call, wall the
whole process (import of transformers and weight init included).
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = ["--temperature", "0.8", "--top-k", "50", "--top-p", "0.9", "--repetition-penalty", "1.1"]
PROMPTS = ["def main():", "import os", "class Reader(object):", "for key, value in", "# Licensed to the",
           "return self.", "if __name__ ==", "with open(path) as handle:"]
_OURS_LINE = re.compile(r"\[(\d+) prompts, (\d+) new tokens in ([\d.]+)s")


def make_model_file(size: str, work: Path) -> tuple[Path, object]:
    """An int8 model file of `size` with random weights and a tokenizer of its vocabulary."""
    import torch

    from andy_dist.config import model_config
    from andy_dist.data.corpus import read_documents, write_default_corpus
    from andy_dist.data.tokenizer import Tokenizer, train_tokenizer
    from andy_dist.infer.model_file import save_model_file
    from andy_dist.model import AndyLM

    cfg = model_config(size, dropout=0.0)
    corpus = write_default_corpus(work / "stdlib.jsonl", max_bytes=300 * cfg.vocab_size)
    tokenizer = Tokenizer.from_file(train_tokenizer(read_documents([str(corpus)]), cfg.vocab_size, work / "tok"))
    torch.manual_seed(0)
    path = save_model_file(work / f"{size}-int8.andy", AndyLM(cfg).state_dict(), cfg, tokenizer, dtype="int8")
    return path, tokenizer


def _run(cmd: list[str], threads: int) -> tuple[str, float]:
    env_threads = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900,
                            env={**_base_env(), **env_threads})
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed: {result.stderr[-2000:]}")
    return result.stderr + result.stdout, wall


def _base_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("DS_ACCELERATOR", "cpu")
    return env


def ours(model: Path, prompts_file: Path, new_tokens: int, threads: int, seed: int) -> dict:
    out, wall = _run([sys.executable, "tools/generate.py", str(model), "--prompts-file", str(prompts_file),
                      "--max-new-tokens", str(new_tokens), "--seed", str(seed), *SETTINGS], threads)
    _, tokens, seconds = _OURS_LINE.search(out).groups()
    return {"tok_s": int(tokens) / float(seconds), "wall_s": wall}


def theirs(size: str, ids_file: Path, new_tokens: int, threads: int, seed: int) -> dict:
    out, wall = _run([sys.executable, "-m", "tools.benchmarks._generate_cold", "hf", size, str(ids_file),
                      str(new_tokens), str(threads), str(seed)], threads)
    return {"tok_s": json.loads(out.strip().splitlines()[-1])["tok_s"], "wall_s": wall}


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 2), "min": round(min(values), 2),
            "max": round(max(values), 2)}


def cold_cli(size: str, batch_sizes: list[int], threads_list: list[int], new_tokens: int, repeats: int,
             with_hf: bool = True) -> dict:
    with tempfile.TemporaryDirectory(prefix="andy-cold-") as work:  # a model file of up to 70 MB
        return _cold_cli(Path(work), size, batch_sizes, threads_list, new_tokens, repeats, with_hf)


def _cold_cli(work: Path, size: str, batch_sizes: list[int], threads_list: list[int], new_tokens: int,
              repeats: int, with_hf: bool) -> dict:
    model, tokenizer = make_model_file(size, work)
    figures: dict = {"shape": size, "new_tokens": new_tokens, "settings": " ".join(SETTINGS), "repeats": repeats,
                     "ours": "tools/generate.py, int8 file, --compile auto", "theirs": "transformers GPT2, fp32"}
    for threads in threads_list:
        for batch in batch_sizes:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
            prompts_file, ids_file = work / f"prompts{batch}.txt", work / f"ids{batch}.json"
            prompts_file.write_text("\n".join(prompts) + "\n")
            ids_file.write_text(json.dumps(tokenizer.encode_batch(prompts, bos=True)))
            pairs = [(ours(model, prompts_file, new_tokens, threads, seed),
                      theirs(size, ids_file, new_tokens, threads, seed) if with_hf else None)
                     for seed in range(repeats)]
            row = {"ours_tok_s": _spread([a["tok_s"] for a, _ in pairs]),
                   "ours_wall_s": _spread([a["wall_s"] for a, _ in pairs])}
            if with_hf:
                row.update({"hf_tok_s": _spread([b["tok_s"] for _, b in pairs]),
                            "ratio": _spread([a["tok_s"] / b["tok_s"] for a, b in pairs]),
                            "hf_wall_s": _spread([b["wall_s"] for _, b in pairs])})
            figures[f"threads_{threads}_batch_{batch}"] = row
            print(f"cold CLI, {threads} thread(s), batch {batch}: {row}", flush=True)
    return figures


def _hf_child(size: str, ids_file: str, new_tokens: int, threads: int, seed: int) -> None:
    """The transformers side, in its own process: prints {"tok_s": ...} for its first generate call."""
    import torch

    torch.set_num_threads(threads)
    from transformers import GPT2Config, GPT2LMHeadModel

    from andy_dist import EOS_ID, PAD_ID
    from andy_dist.config import model_config

    cfg = model_config(size)
    hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                        n_positions=cfg.max_seq_len, bos_token_id=2, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).eval()
    rows = json.loads(Path(ids_file).read_text())
    width = max(len(r) for r in rows)  # left padding, as ours
    ids = torch.tensor([[PAD_ID] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    torch.manual_seed(seed)
    with torch.inference_mode():
        start = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, do_sample=True, temperature=0.8, top_k=50, top_p=0.9,
                             repetition_penalty=1.1, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             pad_token_id=PAD_ID)
        seconds = time.perf_counter() - start
    print(json.dumps({"tok_s": (out.shape[1] - width) * len(rows) / seconds}))


if __name__ == "__main__" and sys.argv[1:2] == ["hf"]:
    _hf_child(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
