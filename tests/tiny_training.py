"""A really trained tiny model for in-process tests (quantization, sample quality): plain PyTorch, a minute.

Documents are the built-in corpus's paragraphs of 60-200 characters, each `[BOS] text [EOS]`, so the
model learns both the text and where documents end. The held-out paragraphs are returned with it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from andy_dist import PAD_ID
from andy_dist.config import ModelConfig
from andy_dist.model import AndyLM


@dataclass
class TrainedTiny:
    cfg: ModelConfig
    untrained: dict  # the same model's weights before training
    trained: dict
    held_out: list[str]  # paragraphs it never saw
    losses: list[float]

    def model(self, trained: bool = True) -> AndyLM:
        model = AndyLM(self.cfg).eval()
        model.load_state_dict(self.trained if trained else self.untrained)
        return model


def paragraphs(corpus: Path) -> list[str]:
    found = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        found.extend(p.strip("\n") for p in json.loads(line)["text"].split("\n\n"))
    found = [p for p in found if 60 <= len(p) <= 200]
    random.Random(0).shuffle(found)
    return found


def train_tiny(corpus: Path, tokenizer, steps: int = 200, batch: int = 16, held_out: int = 200) -> TrainedTiny:
    texts = paragraphs(corpus)
    docs = [tokenizer.encode(t, bos=True, eos=True)[:64] for t in texts[:-held_out]]
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_heads=2, n_layers=2, max_seq_len=64,
                      dropout=0.0)
    model = AndyLM(cfg)
    untrained = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps):
        rows = [docs[i] for i in torch.randint(0, len(docs), (batch,), generator=generator).tolist()]
        ids = torch.full((batch, max(map(len, rows))), PAD_ID)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
        out = model(ids[:, :-1], targets=ids[:, 1:])
        loss = out.loss_sum / out.target_tokens
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return TrainedTiny(cfg, untrained, {k: v.detach().clone() for k, v in model.state_dict().items()},
                       texts[-held_out:], losses)
