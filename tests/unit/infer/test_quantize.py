"""int8 weight-only quantization: the rounding bound, the kernels, and logits close to fp32."""

import pytest
import torch

from andy_dist.config import ModelConfig
from andy_dist.infer.quantize import (
    Int8Linear,
    dequantize_tensor,
    fbgemm_available,
    is_quantized_name,
    quantize_state_dict,
    quantize_tensor,
    swap_int8_linears,
)
from andy_dist.model import AndyLM

# Stated tolerance: int8 logits within 3% of the fp32 logits' largest magnitude (fbgemm also
# quantizes activations to 7 bits; the weight-only kernels stay within 1.5%).
TOLERANCE = {"fbgemm": 0.03, "int8pack": 0.015, "dequant": 0.015, "dense": 0.015}
KERNELS = [k for k in TOLERANCE if k != "fbgemm" or fbgemm_available()]


def test_rounding_error_is_at_most_half_a_step_per_row():
    w = torch.randn(64, 48) * torch.logspace(-3, 0, 64)[:, None]  # rows of very different ranges
    w[3] = 0.0
    q, scale = quantize_tensor(w)
    assert q.dtype == torch.int8 and scale.shape == (64,) and q.abs().max() <= 127
    err = (dequantize_tensor(q, scale) - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(dequantize_tensor(q, scale)[3], torch.zeros(48))


def test_which_weights_are_quantized():
    assert is_quantized_name("blocks.3.attn.qkv.weight") and is_quantized_name("blocks.0.ffn.out.weight")
    assert is_quantized_name("lm_head.weight") and is_quantized_name("embed.weight")
    assert not is_quantized_name("embed.weight", include_embeddings=False)
    assert not is_quantized_name("blocks.0.attn.qkv.bias") and not is_quantized_name("blocks.0.ln_attn.weight")
    state = {"embed.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4), "ln_out.bias": torch.zeros(4)}
    stored = quantize_state_dict(state, tied=True)
    assert set(stored) == {"embed.weight", "embed.weight.scale", "ln_out.bias"}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("rows", [1, 8])
def test_int8_linear_kernels_match_the_dequantized_product(kernel, rows):
    torch.manual_seed(0)
    w, b = torch.randn(96, 64) * 0.05, torch.randn(96)
    q, scale = quantize_tensor(w)
    layer = Int8Linear(q, scale, b, kernel=kernel)
    x = torch.randn(rows, 3, 64)
    ref = torch.nn.functional.linear(x, dequantize_tensor(q, scale), b)
    y = layer(x)
    assert y.shape == (rows, 3, 96) and y.dtype == torch.float32
    assert (y - ref).abs().max() <= TOLERANCE[kernel] * ref.abs().max()


@pytest.mark.parametrize("kernel", KERNELS)
def test_int8_model_logits_close_to_fp32(kernel):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=500, d_model=64, n_heads=4, n_layers=2, dropout=0.0)
    model = AndyLM(cfg).eval()
    ids = torch.randint(4, 500, (2, 24))
    with torch.no_grad():
        ref = model(ids).logits
        stored = quantize_state_dict(model.state_dict())
        swapped = swap_int8_linears(model, stored, kernel)
        assert len(swapped) == 4 * cfg.n_layers + 1  # qkv, proj, fc, out per block + the LM head
        out = model(ids).logits
    assert (out - ref).abs().max() <= TOLERANCE[kernel] * ref.abs().max()
    assert not torch.equal(out, ref)  # the int8 path really ran


def test_moving_to_bf16_keeps_fp32_scales():
    q, scale = quantize_tensor(torch.randn(8, 16))
    layer = Int8Linear(q, scale, torch.zeros(8), kernel="dequant").to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32 and layer.qweight.dtype == torch.int8
    assert layer(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
