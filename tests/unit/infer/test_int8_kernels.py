"""int8 kernels are chosen and prepared when a model file is loaded, not in the first step."""

import pytest
import torch

import andy_dist.infer.quantize as quantize
from andy_dist.config import ModelConfig
from andy_dist.infer.model_file import build_model
from andy_dist.infer.quantize import SCHEME, Int8Linear, default_kernel, quantize_state_dict, quantize_tensor
from andy_dist.model import AndyLM


def int8_model(device="cpu", dtype=None):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, d_model=32, n_heads=2, n_layers=2, dropout=0.0, max_seq_len=64)
    info = {"model_config": cfg.to_dict(),
            "quantization": {"scheme": SCHEME, "float_dtype": "fp32", "embeddings_quantized": True}}
    return build_model(quantize_state_dict(AndyLM(cfg).state_dict()), info, device=device, dtype=dtype)


def test_loading_prepares_every_int8_layer_for_its_device():
    model = int8_model()
    layers = [m for m in model.modules() if isinstance(m, Int8Linear)]
    assert len(layers) == 9 and all(m.active == default_kernel(torch.device("cpu")) for m in layers)
    if quantize.fbgemm_available():
        assert all(m._packed for m in layers)  # packed at load: the first step packs nothing
        packed = [id(p) for m in layers for p in m._packed]
        model(torch.tensor([[2, 5, 6]]))
        assert [id(p) for m in layers for p in m._packed] == packed


def test_packing_in_row_blocks_gives_the_same_product(monkeypatch):
    if not quantize.fbgemm_available():
        pytest.skip("this torch build has no fbgemm")
    torch.manual_seed(1)
    q, scale = quantize_tensor(torch.randn(100, 48) * 0.05)
    bias = torch.randn(100)
    x = torch.randn(5, 48)
    whole = Int8Linear(q, scale, bias, "fbgemm")
    monkeypatch.setattr(quantize, "FBGEMM_PACK_ROWS", 30)
    blocks = Int8Linear(q, scale, bias, "fbgemm")
    blocks.prepare()
    assert len(blocks._packed) == 4
    assert torch.equal(blocks(x), whole(x))  # one activation scale per call: blocks change nothing


def test_dense_kernel_follows_the_model_dtype():
    q, scale = quantize_tensor(torch.randn(16, 8))
    layer = Int8Linear(q, scale, torch.zeros(16), "dense")
    assert layer.prepare(torch.float32) == "dense" and layer.dense.dtype == torch.float32
    ref = torch.nn.functional.linear(torch.ones(2, 8), quantize.dequantize_tensor(q, scale))
    assert torch.equal(layer(torch.ones(2, 8)), ref)
    layer = layer.to(torch.bfloat16)  # a move or cast drops the dense copy; the next call rebuilds it
    assert layer.active is None
    assert layer(torch.ones(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    assert layer.dense.dtype == torch.bfloat16 and "dense" not in layer.state_dict()


def test_default_kernel_per_device():
    assert default_kernel(torch.device("cuda")) == "dense"  # weights dequantized once: never slower than bf16
    assert default_kernel(torch.device("cpu")) in ("fbgemm", "int8pack")
