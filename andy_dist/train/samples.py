"""Text the model writes while it trains: the configured prompts continued by a copy of the model, each
sample with its quality figures (`andy_dist.train.sample_quality`).

A failure here never stops the run: the trainer calls it inside `andy_dist.train.nonfatal.nonfatal`.
"""

from __future__ import annotations

import torch

from andy_dist.config import ModelConfig
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.infer.generate import generate
from andy_dist.infer.token_sampling import SamplingConfig
from andy_dist.model import AndyLM
from andy_dist.train.sample_quality import sample_figures
from andy_dist.train.settings import SampleSettings


class TrainingSamples:
    """Continues each prompt from the weights it is given (rank 0 gets them; other ranks get None)."""

    def __init__(self, settings: SampleSettings, model_cfg: ModelConfig, tokenizer: Tokenizer, device: torch.device,
                 seed: int):
        self.settings, self.model_cfg, self.tokenizer, self.device, self.seed = (settings, model_cfg, tokenizer,
                                                                                 device, seed)
        self.sampling = SamplingConfig(temperature=settings.temperature, top_k=settings.top_k, top_p=settings.top_p)
        self._model: AndyLM | None = None  # a plain fp32 copy, built on first use and refilled each time

    def __call__(self, weights: dict | None, step: int) -> list[dict]:
        if weights is None:
            return []
        if self._model is None:
            self._model = AndyLM(self.model_cfg).to(self.device).eval()
        self._model.load_state_dict(weights)
        prompts = [self.tokenizer.encode(p, bos=True) for p in self.settings.prompts]
        # Only ids the tokenizer has: the model's vocabulary may be larger than the tokenizer's (trained on a
        # smaller tokenizer's shards), and decoding an id past it raises.
        outputs = generate(self._model, prompts, max_new_tokens=self.settings.max_new_tokens, sampling=self.sampling,
                           seed=self.seed + step, valid_vocab=self.tokenizer.vocab_size)
        return [{"prompt": p, "completion": self.tokenizer.decode(o), "temperature": self.sampling.temperature,
                 "top_k": self.sampling.top_k, "top_p": self.sampling.top_p,
                 **sample_figures(self._model, ids, o)}
                for p, ids, o in zip(self.settings.prompts, prompts, outputs)]
