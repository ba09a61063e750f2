"""int8 quantization of the weights: a state-dict transform plus a module swap (as in gpt-fast).

Scheme ("int8-per-channel-symmetric"): every Linear weight W (N out, K in) of the blocks and the LM
head, and the token embedding (one row per token), is stored as int8 Q with one fp32 scale per
output row, s = max|W_row| / 127, Q = round(W / s) in [-127, 127]; W ~= Q * s. Biases, LayerNorms and
the sinusoidal table stay float. Quantizing the embedding and the LM head is what brings the file
to about a quarter of fp32: for every size they are most of the parameters (50,000 x 512 twice for
medium). The benchmark measures the perplexity cost of that choice (tools/benchmarks/generate.py).

At run time `Int8Linear` computes with one of these kernels; what runs where ("auto"):

    CPU, "fbgemm" (default where torch has fbgemm/x86): int8 weights x int8 activations. The
        activations are quantized per call (one scale per call, 7 bits) and multiplied in integers
        by torch.ops.quantized.linear_dynamic over a weight packed once: W8A8 dynamic, so it is
        not weight-only, and the activation rounding is where most of its error comes from.
    CPU, "int8pack" (default without fbgemm): weight-only. torch._weight_int8pack_mm with bf16
        activations (fp32 ones are cast to bf16 first).
    CUDA, "dense" (default): the weights are dequantized once, at load, to the compute dtype (bf16)
        and multiplied by cuBLAS: the int8 file is a storage format there, and int8 runs exactly as
        fast as bf16 (memory: the int8 copy stays too, 3 bytes per weight). torch has no fast eager
        weight-only int8 matmul on CUDA: its _weight_int8pack_mm CUDA kernel is one thread per
        output with a loop over K and an fp32 copy of the activations (aten/src/ATen/native/cuda/
        int8mm.cu), measured on an H200 at 220 / 1,630 / 7,288 tokens/s against bf16's 341 / 2,487 /
        19,116 at batch 1 / 8 / 64 (issue 12).
    any device, "dequant": weight-only in gpt-fast's form, F.linear(x, Q.to(x.dtype)) * s: under
        torch.compile Inductor fuses the int8 -> float conversion into the matmul (the weights are
        read as int8); eager it writes a float copy of W per call (the reference in the tests).

Measured on the project's 2-core x86 CPU (AMD EPYC, AVX-512 VNNI and BF16), one thread, the LM
head of medium (50,000 x 512), ms per call at batch 1 / batch 8, and the one-off preparation:

    fp32 F.linear        6.9 / 22.0
    bf16 F.linear        3.3 /  4.0
    dequant             77   / 55       (writes a fp32 W per call)
    int8pack             1.4 /  4.5     weight-only, bf16 activations
    fbgemm               0.63 / 1.06    packing: 106 ms in row blocks (FBGEMM_PACK_ROWS), 275 ms whole

`prepare()` (called by the model file loader) chooses the kernel and packs or dequantizes the
weights when the model is loaded, not in its first forward pass.

The embedding is dequantized once when loaded: a lookup reads a few rows, so keeping it int8 in
memory would save RAM but no time.
"""

from __future__ import annotations

import functools
import re
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEME = "int8-per-channel-symmetric"
KERNELS = ("auto", "fbgemm", "int8pack", "dequant", "dense")
SCALE_SUFFIX = ".scale"
# Which weights are quantized: the Linear layers of every block, the LM head, the embedding.
_LINEAR = re.compile(r"^(blocks\.\d+\.(attn\.(qkv|proj)|ffn\.(fc|out))|lm_head)\.weight$")
_EMBEDDING = "embed.weight"


def is_quantized_name(name: str, include_embeddings: bool = True) -> bool:
    """Whether the state-dict entry `name` is stored as int8 under this scheme."""
    if name == _EMBEDDING or name == "lm_head.weight":
        return include_embeddings
    return bool(_LINEAR.match(name))


def quantize_tensor(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 (N, K), fp32 scale (N,)), symmetric per output row."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row keeps a harmless scale
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_tensor(q: torch.Tensor, scale: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    return (q * scale.float()[:, None]).to(dtype)  # one pass: int8 * fp32 promotes to fp32


def quantize_state_dict(
    state: dict[str, torch.Tensor], include_embeddings: bool = True, tied: bool = False
) -> dict[str, torch.Tensor]:
    """Float state dict -> the stored form: int8 weights plus `NAME.scale` entries, the rest fp32.

    A tied LM head (`tied`: the model shares it with the embedding) is stored once, as embed.weight.
    """
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if tied and name == "lm_head.weight":
            continue
        if is_quantized_name(name, include_embeddings):
            out[name], out[name + SCALE_SUFFIX] = quantize_tensor(tensor)
        else:
            out[name] = tensor.detach().float().contiguous()
    return out


@functools.lru_cache(maxsize=None)
def fbgemm_available() -> bool:
    engines = torch.backends.quantized.supported_engines  # a lookup that costs ~3 us: not per call
    return "fbgemm" in engines or "x86" in engines


def default_kernel(device: torch.device) -> str:
    """The kernel "auto" runs on `device` (the module docstring gives the measurements)."""
    if device.type == "cpu":
        return "fbgemm" if fbgemm_available() else "int8pack"
    return "dense"


# fbgemm packs a matrix of 50,000 rows (the LM head) in ~420 ms but four of 12,500 rows in ~180 ms,
# with the same speed per call; larger weights are packed in row blocks of at most this many rows.
FBGEMM_PACK_ROWS = 16_384


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 (out, in) and a fp32 scale per output row.

    `prepare()` resolves kernel "auto" for the weights' device and builds what that kernel needs
    (fbgemm's packed weight, the dense copy); `andy_dist.infer.model_file.build_model` calls it at
    load time, so that the first generation step does not pay for it.
    """

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.register_buffer("dense", None, persistent=False)  # kernel "dense": W dequantized once
        self.kernel = kernel
        self.active: Optional[str] = None  # the kernel in use, once prepared
        self._packed: list = []  # kernel "fbgemm": packed row blocks of W (CPU)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}, active={self.active}"

    def prepare(self, dtype: Optional[torch.dtype] = None) -> str:
        """Choose the kernel for the weights' device and build its form of W; dtype: the activations'
        (for "dense"; default: the bias's, else fp32). Returns the kernel chosen."""
        device = self.qweight.device
        kernel = self.kernel if self.kernel != "auto" else default_kernel(device)
        if kernel == "fbgemm":
            if device.type != "cpu":
                raise RuntimeError("the fbgemm int8 kernel runs on CPU only; use 'dense', 'dequant' or 'int8pack'")
            self._packed = self._pack()
        elif kernel == "dense":
            dtype = dtype or (self.bias.dtype if self.bias is not None else torch.float32)
            self.dense = dequantize_tensor(self.qweight, self.scale, dtype)
        self.active = kernel
        return kernel

    def _pack(self) -> list:
        blocks, count = [], -(-self.out_features // FBGEMM_PACK_ROWS)
        bounds = [self.out_features * i // count for i in range(count + 1)]  # even row blocks
        for first, last in zip(bounds, bounds[1:]):
            zeros = torch.zeros(last - first, dtype=torch.long)
            with warnings.catch_warnings():  # torch.ao's deprecation notice; the kernel itself stays in core
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(self.qweight[first:last], self.scale[first:last].double(),
                                                              zeros, 0)
            bias = None if self.bias is None else self.bias[first:last].float()
            blocks.append(torch.ops.quantized.linear_prepack(qw, bias))
        return blocks

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        if self.active is None or (self.active == "dense" and self.dense.dtype != x.dtype):
            self.prepare(x.dtype)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.active == "fbgemm":
            y = self._fbgemm(x2)
        elif self.active == "int8pack":
            y = self._int8pack(x2)
        elif self.active == "dense":
            y = F.linear(x2, self.dense, None if self.bias is None else self.bias.to(x.dtype))
        else:
            y = self._dequant(x2)
        return y.reshape(*shape, self.out_features).to(x.dtype)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        # reduce_range=True: 7-bit activations avoid the x86 kernel's 16-bit accumulation overflow.
        x = x.float().contiguous()
        parts = [torch.ops.quantized.linear_dynamic(x, packed, True) for packed in self._packed]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)

    def _int8pack(self, x: torch.Tensor) -> torch.Tensor:
        # Its CPU kernel is fast only for 16-bit activations; fp32 ones go through bf16.
        compute = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        y = torch._weight_int8pack_mm(x.to(compute).contiguous(), self.qweight, self.scale.to(compute))
        return y if self.bias is None else y + self.bias.to(compute)

    def _dequant(self, x: torch.Tensor) -> torch.Tensor:
        # gpt-fast's form: the int8 -> float conversion feeds the matmul and the scale follows it, a
        # pattern torch.compile fuses into one kernel that reads int8; eager, it writes a float W per call.
        y = F.linear(x, self.qweight.to(x.dtype)) * self.scale.to(x.dtype)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def _apply(self, fn, recurse=True):
        # A move or dtype change invalidates the packed and dense forms: prepare() runs again.
        self._packed, self.dense, self.active = [], None, None
        super()._apply(fn, recurse)
        self.scale = self.scale.float()  # a model-wide .to(bf16) must not round the scales
        return self


def prepare_int8(model: nn.Module, dtype: Optional[torch.dtype] = None) -> dict[str, str]:
    """Prepare every Int8Linear of `model` for its device (see `Int8Linear.prepare`); returns
    {module name: kernel}."""
    return {name: m.prepare(dtype) for name, m in model.named_modules() if isinstance(m, Int8Linear)}


def swap_int8_linears(model: nn.Module, stored: dict[str, torch.Tensor], kernel: str = "auto") -> list[str]:
    """Replace each Linear whose weight is int8 in `stored` by an Int8Linear; returns their names."""
    swapped = []
    for module_name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear):
            continue
        key = f"{module_name}.weight"
        if key + SCALE_SUFFIX not in stored:
            continue
        bias = stored.get(f"{module_name}.bias")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Int8Linear(stored[key], stored[key + SCALE_SUFFIX], bias, kernel))
        swapped.append(module_name)
    return swapped
