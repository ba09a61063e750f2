"""The model: parameter counts, causality, padding, activation checkpointing, PAD-free loss, bad configs."""

import pytest
import torch

from andy_dist import PAD_ID
from andy_dist.config import SIZES, ConfigError, ModelConfig, model_config
from andy_dist.model import AndyLM, KVCache, token_loss

SMALL = ModelConfig(vocab_size=300, d_model=64, n_heads=4, n_layers=2, dropout=0.0)


def make_model(cfg=SMALL, seed=0, activation_checkpointing=False):
    torch.manual_seed(seed)
    return AndyLM(cfg, activation_checkpointing=activation_checkpointing).eval()


# Counted by the code (untied head, the default); README explains the gap to the rounded sizes.
@pytest.mark.parametrize("size,expected,tied", [
    ("tiny", 2_956_800, 1_676_800), ("small", 18_519_552, 10_839_552), ("medium", 70_115_328, 44_515_328)])
def test_parameter_counts(size, expected, tied):
    assert AndyLM(SIZES[size]).num_parameters() == expected
    assert AndyLM(SIZES[size].replace(tie_embeddings=True)).num_parameters() == tied


def test_sizes_match_the_specification():
    spec = {"tiny": (10_000, 128, 2, 2), "small": (30_000, 256, 4, 4), "medium": (50_000, 512, 8, 6)}
    for name, (vocab, d, heads, layers) in spec.items():
        cfg = SIZES[name]
        assert (cfg.vocab_size, cfg.d_model, cfg.n_heads, cfg.n_layers) == (vocab, d, heads, layers)
        assert cfg.max_seq_len == 512 and cfg.ffn_mult == 4 and cfg.dropout == 0.1
    block = AndyLM(SIZES["tiny"]).blocks[0]
    assert block.ffn.fc.out_features == 4 * 128


def test_causality_later_tokens_never_change_earlier_logits():
    model = make_model()
    ids = torch.randint(4, SMALL.vocab_size, (2, 24))
    changed = ids.clone()
    changed[:, 15:] = torch.randint(4, SMALL.vocab_size, (2, 9))
    a, b = model(ids).logits, model(changed).logits
    torch.testing.assert_close(a[:, :15], b[:, :15], rtol=0, atol=1e-5)
    assert not torch.allclose(a[:, 15:], b[:, 15:])


def test_right_padding_leaves_real_positions_unchanged():
    model = make_model()
    ids = torch.randint(4, SMALL.vocab_size, (1, 17))
    padded = torch.cat([ids, torch.full((1, 7), PAD_ID)], dim=1)
    mask = torch.cat([torch.ones(1, 17), torch.zeros(1, 7)], dim=1).long()
    alone = model(ids).logits
    with_mask = model(padded, attention_mask=mask).logits[:, :17]
    without_mask = model(padded).logits[:, :17]  # what the trainer does: causal attention alone
    torch.testing.assert_close(with_mask, alone, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(without_mask, alone, rtol=1e-5, atol=1e-5)


def test_left_padding_positions_start_at_first_real_token():
    model = make_model()
    ids = torch.randint(4, SMALL.vocab_size, (1, 10))
    padded = torch.cat([torch.full((1, 5), PAD_ID), ids], dim=1)
    mask = torch.cat([torch.zeros(1, 5), torch.ones(1, 10)], dim=1).long()
    out = model(padded, attention_mask=mask).logits
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 5:], model(ids).logits, rtol=1e-5, atol=1e-5)


def test_kv_cache_decoding_matches_full_forward():
    model = make_model()
    ids = torch.randint(4, SMALL.vocab_size, (2, 12))
    full = model(ids).logits
    cache = KVCache(SMALL, batch_size=2, max_len=12)
    prefill = model(ids[:, :8], kv_cache=cache).logits
    steps = [model(ids[:, t:t + 1], kv_cache=cache).logits for t in range(8, 12)]
    torch.testing.assert_close(torch.cat([prefill] + steps, dim=1), full, rtol=1e-5, atol=1e-5)
    assert cache.length == 12


def test_activation_checkpointing_same_loss_and_gradients():
    """With the model's dropout (0.1) on: the recomputation in backward must draw the same dropout masks as
    the forward pass did, or the gradients would belong to another network. Seeding before each pass gives
    both runs the same masks, so any difference comes from checkpointing itself."""
    cfg = SMALL.replace(dropout=0.1)
    ids = torch.randint(4, cfg.vocab_size, (2, 16))
    targets = torch.roll(ids, -1, dims=1)
    results = []
    for checkpointing in (False, True):
        model = make_model(cfg, activation_checkpointing=checkpointing).train()
        torch.manual_seed(123)
        out = model(ids, targets=targets)
        out.loss_sum.backward()
        results.append((out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    torch.testing.assert_close(results[0][0], results[1][0])
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
    model = make_model(cfg).train()
    torch.manual_seed(124)
    assert not torch.equal(model(ids, targets=targets).loss_sum.detach(), results[0][0])  # dropout is really on


def test_loss_ignores_pad_targets_and_counts_tokens():
    model = make_model()
    ids = torch.randint(4, SMALL.vocab_size, (2, 10))
    targets = torch.randint(4, SMALL.vocab_size, (2, 10))
    targets[0, 6:] = PAD_ID
    out = model(ids, targets=targets)
    assert out.target_tokens.item() == 16  # 6 + 10
    assert out.logits is None  # the loss is chunked: the logits are never formed whole
    logits = model(ids).logits
    # Changing the logits' targets at PAD positions to anything else would change the loss; PAD adds nothing.
    manual = torch.nn.functional.cross_entropy(logits[0, :6], targets[0, :6], reduction="sum") + \
        torch.nn.functional.cross_entropy(logits[1], targets[1], reduction="sum")
    torch.testing.assert_close(out.loss_sum, manual)
    loss, count = token_loss(logits, torch.full_like(targets, PAD_ID))
    assert loss.item() == 0.0 and count.item() == 0


def test_sequence_longer_than_maximum_is_refused():
    model = make_model(SMALL.replace(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.ones(1, 17, dtype=torch.long))


@pytest.mark.parametrize("changes,field", [
    ({"n_heads": 3}, "n_heads"), ({"d_model": 0}, "d_model"), ({"n_layers": -1}, "n_layers"),
    ({"vocab_size": 0}, "vocab_size"), ({"max_seq_len": 1024}, "max_seq_len"), ({"dropout": 1.5}, "dropout")])
def test_bad_configs_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        SMALL.replace(**changes)


def test_unknown_size_is_refused():
    with pytest.raises(ConfigError, match="huge"):
        model_config("huge")
