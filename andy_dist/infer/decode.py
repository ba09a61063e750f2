"""The one-token decode step of generation: eager, compiled, or replayed from a CUDA graph.

`AndyLM.decode_step` keeps its shapes from step to step (it attends over the whole preallocated
cache through a mask, and writes at a position given as a tensor), so one step can be

    "off"        run eagerly: every layer's ops dispatched from Python at every step;
    "inductor"   compiled with torch.compile (Inductor): fused kernels; on CUDA with
                 mode="reduce-overhead", which also replays them from CUDA graphs (gpt-fast's way);
                 the first step of each shape pays the compilation (seconds to a minute);
    "cudagraph"  captured in a CUDA graph once per shape and replayed (CUDA only): one launch per
                 step instead of dozens, no compiler, milliseconds to capture;
    "auto"       "cudagraph" on CUDA, "off" on CPU (see DEFAULT_MODE).

A decode step of the medium model is a few dozen small kernels: on a GPU eager decoding waits on
the CPU that launches them (341 tokens/s at batch 1 on an H200). On CPU there is nothing to
replay, and Inductor's gain is measured by `tools/bench.py generate --compile-modes off,inductor`.
Inductor compiles with dynamic shapes: one compilation serves every batch size >= 2 and every cache
length (batch 1 is specialised: a second one). The CUDA paths are proven by the gpu-marked tests of
tests/unit/infer/test_decode_compile.py and measured by scripts/gpu_checks.sh; the bucketing and the rows
leaving a batch are the same code under "inductor", tested on CPU.

Shapes: batch size B and cache length S. Outside "off" each distinct shape is one more capture or
compilation, so both come from a few buckets: S is rounded up to a multiple of 64 (at most the
model's max_seq_len), and rows that finish leave the batch only when the rows still running fit
in the next power of two (finished rows that fill the bucket keep being fed PAD, as rows do before
they leave). A batch of 64 thus sees at most 7 batch sizes. The graphs, compiled code and caches of
a model are kept with it (`decoder_for`) and serve every later generate() call of that shape.
"""

from __future__ import annotations

from typing import Optional

import torch

from andy_dist import UserError
from andy_dist.infer.quantize import Int8Linear
from andy_dist.model import AndyLM, KVCache

MODES = ("auto", "off", "inductor", "cudagraph")
# What "auto" means per device type. CUDA: the decode step is launch-bound (see above), and a capture
# costs milliseconds where a compilation costs a CLI user most of a minute (not yet measured against
# each other on a GPU: scripts/gpu_checks.sh does, step 3). CPU (medium, one thread,
# `bench.py generate --by-mode --compile-modes off,inductor`): fp32 compiled 46 tokens/s vs 50 eager at
# batch 1, 158 vs 141 at batch 8, after 11-48 s of compilation; int8 runs fbgemm, which cannot be traced.
DEFAULT_MODE = {"cuda": "cudagraph", "cpu": "off"}
CACHE_LENGTH_STEP = 64


def resolve_mode(mode: str, device: torch.device) -> str:
    """The mode that runs for `mode` on `device`; a mode the device cannot run is a UserError."""
    if mode not in MODES:
        raise UserError(f"--compile must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        return DEFAULT_MODE.get(device.type, "off")
    if mode == "cudagraph" and device.type != "cuda":
        raise UserError(f"--compile cudagraph needs a CUDA device, not {device.type}; use inductor or off")
    return mode


class Decoder:
    """Runs `model.decode_step` eagerly ("off"), and allocates the caches it writes to."""

    mode = "off"

    def __init__(self, model: AndyLM):
        self.model = model
        self.device = model.ln_out.weight.device
        self.dtype = model.ln_out.weight.dtype

    def cache_length(self, needed: int) -> int:
        return needed

    def batch_size(self, live: int, current: int) -> int:
        """How many rows the batch keeps when `live` of its `current` rows are still running."""
        return live

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache(self.model.cfg, batch, length, device=self.device, dtype=self.dtype)

    def keep_rows(self, cache: KVCache, rows: torch.Tensor) -> KVCache:
        """The cache of the batch that keeps only `rows` (their order kept)."""
        cache.reorder(rows)
        return cache

    def step(self, cache: KVCache, token, position, write_at, key_mask) -> torch.Tensor:
        """(B, V) logits of one step; see `AndyLM.decode_step` for the arguments."""
        return self.model.decode_step(token, position, cache, write_at, key_mask)


class _StaticShapes(Decoder):
    """Bucketed shapes, and one cache per shape kept at a fixed address (graphs read and write it)."""

    def __init__(self, model: AndyLM):
        super().__init__(model)
        self.caches: dict[tuple[int, int], KVCache] = {}

    def cache_length(self, needed: int) -> int:
        step = CACHE_LENGTH_STEP
        return min(-(-needed // step) * step, self.model.cfg.max_seq_len)

    def batch_size(self, live: int, current: int) -> int:
        return min(current, 1 << max(live - 1, 0).bit_length())  # the next power of two

    def new_cache(self, batch: int, length: int) -> KVCache:
        cache = self.caches.get((batch, length))
        if cache is None:
            cache = self.caches[(batch, length)] = super().new_cache(batch, length)
        else:  # stale keys are masked, but 0 * a stale inf would still be NaN
            cache.keys.zero_()
            cache.values.zero_()
        cache.length = 0
        return cache

    def keep_rows(self, cache: KVCache, rows: torch.Tensor) -> KVCache:
        kept = self.new_cache(len(rows), cache.max_len)
        kept.keys.copy_(cache.keys[:, rows])
        kept.values.copy_(cache.values[:, rows])
        kept.length = cache.length
        return kept


class InductorDecoder(_StaticShapes):
    """`decode_step` compiled by torch.compile; on CUDA in mode "reduce-overhead" (CUDA graphs too)."""

    mode = "inductor"

    def __init__(self, model: AndyLM):
        super().__init__(model)
        fbgemm = [name for name, m in model.named_modules() if isinstance(m, Int8Linear)
                  and (m.active or m.prepare()) == "fbgemm"]
        if fbgemm:  # measured: 2x slower than eager, one graph per layer, then eager past dynamo's limit
            raise UserError(f"--compile inductor cannot trace fbgemm's packed int8 kernel (CPU, e.g. {fbgemm[0]}); "
                            f"use --compile off, the faster choice for int8 on CPU")
        cuda = self.device.type == "cuda"
        self.compiled = torch.compile(model.decode_step, mode="reduce-overhead" if cuda else None, dynamic=True)

    def new_cache(self, batch: int, length: int) -> KVCache:
        cache = super().new_cache(batch, length)
        if self.device.type == "cuda":  # written in place by the graph: its address must not move
            import torch._dynamo

            torch._dynamo.mark_static_address(cache.keys)
            torch._dynamo.mark_static_address(cache.values)
        return cache

    def step(self, cache, token, position, write_at, key_mask) -> torch.Tensor:
        if self.device.type != "cuda":
            return self.compiled(token, position, cache, write_at, key_mask)
        # The graphs' outputs live in memory the next replay overwrites: a copy outlives it (an
        # ensemble steps several models before it reads their logits).
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(token, position, cache, write_at, key_mask).clone()


class _Graph:
    """One captured decode step: its static inputs, its output, the graph."""

    def __init__(self, cache: KVCache, key_mask: torch.Tensor):
        B, device = cache.batch_size, key_mask.device
        self.cache = cache
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.write_at = torch.zeros(1, dtype=torch.long, device=device)
        self.key_mask = torch.zeros_like(key_mask)
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.logits: Optional[torch.Tensor] = None

    def args(self):
        return self.token, self.position, self.cache, self.write_at, self.key_mask


class CudaGraphDecoder(_StaticShapes):
    """`decode_step` captured in a CUDA graph per (batch, cache length) and replayed."""

    mode = "cudagraph"

    def __init__(self, model: AndyLM):
        super().__init__(model)
        self.graphs: dict[tuple[int, int], _Graph] = {}  # one per cache in self.caches
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every graph of the model

    def step(self, cache, token, position, write_at, key_mask) -> torch.Tensor:
        shape = (cache.batch_size, cache.max_len)
        graph = self.graphs.get(shape)
        if graph is None:
            if self.caches.get(shape) is not cache:
                raise ValueError("a CUDA graph decoder steps only caches it made (new_cache, keep_rows)")
            graph = self.graphs[shape] = _Graph(cache, key_mask)
        for static, value in ((graph.token, token), (graph.position, position), (graph.write_at, write_at),
                              (graph.key_mask, key_mask)):
            static.copy_(value)
        if graph.graph is None:
            self._capture(graph)
        graph.graph.replay()
        return graph.logits

    def _capture(self, graph: _Graph) -> None:
        # Warm up on a side stream first (cuBLAS workspaces, lazy init), as torch.cuda.graphs asks.
        # Each run writes this step's keys and values into the cache, the same values every time.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.model.decode_step(*graph.args())
        torch.cuda.current_stream().wait_stream(side)
        graph.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph.graph, pool=self.pool):
            graph.logits = self.model.decode_step(*graph.args())


_DECODERS = {"off": Decoder, "inductor": InductorDecoder, "cudagraph": CudaGraphDecoder}


def decoder_for(model: AndyLM, mode: str = "off") -> Decoder:
    """The decoder of `model` in `mode` ("auto" resolved for the model's device). Compiled and
    captured ones are kept on the model (attribute `_decoders`), so later calls reuse their work."""
    mode = resolve_mode(mode, model.ln_out.weight.device)
    if mode == "off":
        return Decoder(model)
    kept = vars(model).setdefault("_decoders", {})
    if mode not in kept:
        kept[mode] = _DECODERS[mode](model)
    return kept[mode]
