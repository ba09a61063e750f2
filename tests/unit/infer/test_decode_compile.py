"""The decode step compiled (Inductor, on CPU here) or captured in a CUDA graph gives the tokens of
the eager one: greedy, a left-padded batch, rows leaving it (andy_dist/infer/decode.py).

Compiling takes tens of seconds on 2 cores, so one tiny model is compiled once for the module and
every CPU case reuses its compiled step (decoders are kept on the model). Its shapes stay at batch
sizes >= 2 (Inductor specialises batch 1: another compilation).
"""

import pytest
import torch

from andy_dist import UserError
from andy_dist.infer import decode
from andy_dist.infer.generate import _generate_batch, generate
from andy_dist.infer.token_sampling import SamplingConfig
from tests.unit.infer.test_generate import greedy_without_cache, tiny_model

GREEDY = SamplingConfig(temperature=0)
# Left-padded: lengths 1 to 6. With the budgets below, the row with budget 3 stops first (a quarter of
# the batch: an eager batch sheds it, a compiled one keeps it to stay at 4 rows), then at step 5 two
# rows run on and both kinds of batch go down to 2.
PROMPTS = [[2, 5, 6, 7, 8, 9], [2, 11], [2, 12, 13, 14], [2]]
BUDGETS = [3, 12, 5, 12]


@pytest.fixture(scope="module")
def model():
    return tiny_model(11)


def run_batch(model, mode, sampling=GREEDY):
    decoder = decode.decoder_for(model, mode)
    tokens, done = _generate_batch([decoder], PROMPTS, BUDGETS, sampling, -1, None, [0] * len(PROMPTS))
    return tokens, done, decoder


def test_compiled_step_gives_the_eager_tokens_with_padding_and_rows_leaving(model):
    eager, eager_done, _ = run_batch(model, "off")
    compiled, done, decoder = run_batch(model, "inductor")
    assert [len(t) for t in eager] == BUDGETS and eager_done == [True] * 4
    assert compiled == eager and done == eager_done
    assert sorted(decoder.caches) == [(2, 64), (4, 64)]  # one cache length bucket, batch 4 then 2
    solo = [greedy_without_cache(model, p, n) for p, n in zip(PROMPTS, BUDGETS)]
    assert compiled == solo  # and each row is what it is alone, without any cache


def test_compiled_step_is_kept_and_reused_with_a_repetition_penalty(model):
    sampling = SamplingConfig(temperature=0, repetition_penalty=1.5)
    eager, _, _ = run_batch(model, "off", sampling)
    compiled, _, decoder = run_batch(model, "inductor", sampling)
    assert compiled == eager
    assert decode.decoder_for(model, "inductor") is decoder
    # Through generate(): batches of 2 and 4 prompts, the same compiled step.
    prompts = PROMPTS + [[2, 30, 31], [2, 40]]
    assert generate(model, prompts, 7, GREEDY, eos_id=-1, batch_size=4, compile="inductor") == \
        generate(model, prompts, 7, GREEDY, eos_id=-1, batch_size=4)


def test_buckets_for_compiled_shapes():
    model = tiny_model(12, max_seq_len=150)
    static = decode._StaticShapes(model)
    assert [static.cache_length(n) for n in (1, 64, 65, 140)] == [64, 64, 128, 150]  # capped at max_seq_len
    assert [static.batch_size(live, 8) for live in (8, 7, 5, 4, 3, 2, 1)] == [8, 8, 8, 4, 4, 2, 1]
    assert static.batch_size(5, 6) == 6  # never above the batch it is
    assert decode.Decoder(model).batch_size(3, 8) == 3  # eager: exactly the rows still running


def test_modes_by_device_and_bad_modes():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert decode.resolve_mode("auto", cpu) == decode.DEFAULT_MODE["cpu"]
    assert decode.resolve_mode("auto", cuda) == "cudagraph"
    with pytest.raises(UserError, match="needs a CUDA device"):
        decode.resolve_mode("cudagraph", cpu)
    with pytest.raises(UserError, match="--compile must be one of"):
        decode.resolve_mode("fast", cpu)


def test_inductor_refuses_fbgemm_int8_layers_it_cannot_trace():
    from tests.unit.infer.test_int8_kernels import int8_model

    model = int8_model()
    if {m.active for m in model.modules() if hasattr(m, "active")} != {"fbgemm"}:
        pytest.skip("this torch build has no fbgemm")
    with pytest.raises(UserError, match="cannot trace fbgemm"):
        decode.decoder_for(model, "inductor")


def int8_and_bf16_twins():
    """An int8 model on CUDA and the bf16 model of its dequantized weights."""
    from andy_dist.infer.model_file import build_model
    from andy_dist.infer.quantize import SCHEME, dequantize_tensor, quantize_state_dict

    fp32 = tiny_model(13)
    stored = quantize_state_dict(fp32.state_dict())
    info = {"model_config": fp32.cfg.to_dict(),
            "quantization": {"scheme": SCHEME, "float_dtype": "fp32", "embeddings_quantized": True}}
    int8 = build_model(stored, info, device="cuda")
    dense = {k: dequantize_tensor(v, stored[k + ".scale"]) if k + ".scale" in stored else v
             for k, v in stored.items() if not k.endswith(".scale")}
    fp32.load_state_dict(dense)
    return int8, fp32.to(device="cuda", dtype=torch.bfloat16)


@pytest.mark.gpu
def test_cuda_graph_step_gives_the_eager_tokens():
    model = tiny_model(14).to(device="cuda", dtype=torch.bfloat16)
    eager, _, _ = run_batch(model, "off")
    graphed, _, decoder = run_batch(model, "cudagraph")
    assert graphed == eager  # the same kernels, replayed
    assert sorted(decoder.graphs) == [(2, 64), (4, 64)]
    again, _, _ = run_batch(model, "cudagraph")  # replays the graphs already captured
    assert again == eager and sorted(decoder.graphs) == [(2, 64), (4, 64)]


@pytest.mark.gpu
def test_compiled_step_on_cuda_gives_the_eager_tokens():
    model = tiny_model(15).to("cuda")
    eager, _, _ = run_batch(model, "off")
    compiled, _, _ = run_batch(model, "inductor")
    assert compiled == eager


@pytest.mark.gpu
def test_int8_gives_the_tokens_of_bf16_with_its_weights_on_cuda():
    int8, bf16 = int8_and_bf16_twins()
    assert {m.active for m in int8.modules() if hasattr(m, "active")} == {"dense"}
    for mode in ("off", "cudagraph"):
        assert run_batch(int8, mode)[0] == run_batch(bf16, mode)[0]
