"""int8 weight-only quantization: a state-dict transform plus a module swap (as in gpt-fast).

Scheme ("int8-per-channel-symmetric"): every Linear weight W (N out, K in) of the blocks and the LM
head, and the token embedding (one row per token), is stored as int8 Q with one fp32 scale per
output row, s = max|W_row| / 127, Q = round(W / s) in [-127, 127]; W ~= Q * s. Biases, LayerNorms and
the sinusoidal table stay float. Quantizing the embedding and the LM head is what brings the file
to about a quarter of fp32: for every size they are most of the parameters (50,000 x 512 twice for
medium). The benchmark measures the perplexity cost of that choice (tools/benchmarks/generate.py).

At run time `Int8Linear` multiplies with one of these kernels, chosen by measurement on a 2-core
x86 CPU (medium shapes, batch 1 and 8, one thread; ms per call, LM head 50,000 x 512):

    fp32 F.linear                 8.9  (b1)  25.4 (b8)
    dequantize-on-the-fly        178   (b1) 217   (b8)  (writes a fp32 copy of W each call)
    torch._weight_int8pack_mm    3.4   (b1)  13.6 (b8)  with bf16 activations; fp32 ones: 34 / 396
    fbgemm dynamic int8 (x86)    1.9   (b1)   3.7 (b8)  activations quantized per call to 8 bits

so "fbgemm" (torch.ops.quantized.linear_dynamic over a per-channel packed weight) is the CPU
default, "int8pack" the alternative where activation quantization costs too much quality, and
"dequant" the portable fallback (and the reference the others are tested against). On CUDA the
default is int8pack where the build has it, else dequant.

The embedding is dequantized once when loaded: a lookup reads a few rows, so keeping it int8 in
memory would save RAM but no time.
"""

from __future__ import annotations

import re
import warnings
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

SCHEME = "int8-per-channel-symmetric"
KERNELS = ("auto", "fbgemm", "int8pack", "dequant")
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
    return (q.float() * scale.float()[:, None]).to(dtype)


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


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


class Int8Linear(nn.Module):
    """y = x W^T + b with W held as int8 (out, in) and a fp32 scale per output row."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bias: Optional[torch.Tensor], kernel: str = "auto"):
        super().__init__()
        if kernel not in KERNELS:
            raise ValueError(f"int8 kernel must be one of {KERNELS}, got {kernel!r}")
        self.out_features, self.in_features = q.shape
        self.register_buffer("qweight", q.contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.float().contiguous())
        self.kernel = kernel
        self._packed = None  # fbgemm's prepacked weight, built on first CPU use
        self._int8pack_ok = True

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel}"

    def chosen_kernel(self, x: torch.Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        if x.device.type == "cpu":
            return "fbgemm" if fbgemm_available() else "int8pack"
        return "int8pack" if self._int8pack_ok else "dequant"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        kernel = self.chosen_kernel(x)
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if kernel == "fbgemm":
            y = self._fbgemm(x2)
        elif kernel == "int8pack":
            y = self._int8pack(x2)
        else:
            y = self._dequant(x2)
        return y.reshape(*shape, self.out_features).to(x.dtype)

    def _fbgemm(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("the fbgemm int8 kernel runs on CPU only; use kernel='int8pack' or 'dequant'")
        if self._packed is None:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # torch.ao's deprecation notice; the kernel itself stays in core
                warnings.simplefilter("ignore")
                qw = torch._make_per_channel_quantized_tensor(self.qweight, self.scale.double(), zeros, 0)
            self._packed = torch.ops.quantized.linear_prepack(qw, self.bias)
        # reduce_range=True: 7-bit activations avoid the x86 kernel's 16-bit accumulation overflow.
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, True)

    def _int8pack(self, x: torch.Tensor) -> torch.Tensor:
        # Its CPU kernel is fast only for 16-bit activations; fp32 ones go through bf16.
        compute = x.dtype if x.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
        try:
            y = torch._weight_int8pack_mm(x.to(compute).contiguous(), self.qweight, self.scale.to(compute))
        except (RuntimeError, NotImplementedError):
            if self.kernel == "int8pack":
                raise
            self._int8pack_ok = False  # this build/device has no such kernel: fall back for good
            return self._dequant(x)
        return y if self.bias is None else y + self.bias.to(compute)

    def _dequant(self, x: torch.Tensor) -> torch.Tensor:
        w = self.qweight.to(x.dtype) * self.scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))

    def _apply(self, fn, recurse=True):
        self._packed = None  # a move or dtype change invalidates the prepacked weight
        super()._apply(fn, recurse)
        self.scale = self.scale.float()  # a model-wide .to(bf16) must not round the scales
        return self


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
