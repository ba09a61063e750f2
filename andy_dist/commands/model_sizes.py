"""Print each Andy-LLM size's shape and parameter count as the code computes it.

    python tools/model_sizes.py
"""

from andy_dist.cli import run_tool

DOCUMENTED = {"tiny": "~5M", "small": "~20M", "medium": "~100M"}


def main(argv=None) -> int:
    from andy_dist.config import SIZES
    from andy_dist.model import AndyLM

    print(f"{'size':<8}{'vocab':>8}{'d':>6}{'heads':>7}{'layers':>8}{'params':>14}{'tied':>14}{'documented':>12}")
    for name, cfg in SIZES.items():
        untied = AndyLM(cfg).num_parameters()
        tied = AndyLM(cfg.replace(tie_embeddings=True)).num_parameters()
        print(f"{name:<8}{cfg.vocab_size:>8,}{cfg.d_model:>6}{cfg.n_heads:>7}{cfg.n_layers:>8}{untied:>14,}{tied:>14,}"
              f"{DOCUMENTED[name]:>12}")
    return 0


def run() -> None:
    run_tool(main)
