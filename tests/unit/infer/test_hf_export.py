"""The Hugging Face export and import against the real `transformers` library (CPU, nothing downloaded).

Two small models (untied and tied head) are trained for a hundred-odd steps on the session's real shards, saved
as fp32 .andy files, and exported with `andy-export --hf --from` (run in this process through the command's
main). Then: transformers' logits equal ours, its greedy `generate` (left-padded batch included) and
`pipeline` give the tokens `andy-generate` gives, its perplexity on the validation split equals
`andy-evaluate`'s, and export -> import -> export gives identical tensors. A GPT-2 model built by transformers
itself (learned position table, gelu_new, 1,024 positions) imports with its table kept as given.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from andy_dist import EOS_ID, PAD_ID, UserError
from andy_dist.config import ModelConfig
from andy_dist.model import AndyLM

transformers = pytest.importorskip("transformers")

PROMPTS = ["def main():", "import os\nimport sys\n\n", "class Parser(object):\n    def __init__(self", "x"]


def _train(shards, tokenizer, cfg: ModelConfig, steps: int = 120) -> dict:
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.stream import TrainStream

    torch.manual_seed(0)
    model = AndyLM(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    stream = TrainStream(open_shards(shards, tokenizer=tokenizer), rank=0, world_size=1, micro_batch_size=16,
                         grad_accum=1, seed=0, max_seq_len=cfg.max_seq_len)
    for _, step in zip(range(steps), stream.iter_epoch()):
        for mb in step.micro_batches:
            out = model(mb.input_ids, targets=mb.targets, attention_mask=mb.attention_mask)
            (out.loss_sum / out.target_tokens).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.state_dict()


def export_main(*args) -> int:
    from andy_dist.commands.export import main

    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def models(train_shards, tokenizer, tmp_path_factory):
    """{"untied"|"tied": (model.andy fp32, exported HF directory)} of two briefly trained models."""
    from andy_dist.infer.model_file import save_model_file

    base = tmp_path_factory.mktemp("hf")
    made = {}
    for name, tied in (("untied", False), ("tied", True)):
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
                          dropout=0.0, tie_embeddings=tied)
        path = save_model_file(base / f"{name}.andy", _train(train_shards, tokenizer, cfg), cfg, tokenizer, "fp32",
                               source={"step": 120})
        assert export_main("--hf", base / f"hf-{name}", "--from", path) == 0
        made[name] = (path, base / f"hf-{name}")
    return made


def real_text_ids(builtin_corpus, tokenizer, n: int = 120) -> torch.Tensor:
    text = json.loads(builtin_corpus.read_text().splitlines()[3])["text"]
    return torch.tensor([tokenizer.encode(text, bos=True)[:n]])


@pytest.mark.parametrize("name", ["untied", "tied"])
def test_logits_equal_the_fp32_model_file(models, name, builtin_corpus, tokenizer):
    from andy_dist.infer.model_file import load_model_file

    path, hf_dir = models[name]
    ours, _, _ = load_model_file(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    assert type(hf).__name__ == "GPT2LMHeadModel" and hf.config.tie_word_embeddings == (name == "tied")
    ids = real_text_ids(builtin_corpus, tokenizer)
    batch = torch.cat([ids, torch.cat([torch.full((1, 20), PAD_ID), ids[:, :-20]], dim=1)])  # row 2 left-padded
    mask = (torch.arange(ids.shape[1]) >= torch.tensor([[0], [20]])).long()
    with torch.no_grad():
        want = ours(batch, attention_mask=mask).logits
        got = hf(batch, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits
    real = mask.bool()
    assert (got - want)[real].abs().max() < 1e-5


def _hf_greedy(hf, hf_tok, prompts: list[str], new: int) -> list[list[int]]:
    inputs = hf_tok(prompts, return_tensors="pt", padding=True)
    out = hf.generate(**inputs, max_new_tokens=new, do_sample=False)[:, inputs["input_ids"].shape[1]:].tolist()
    return [row[: row.index(EOS_ID) + 1] if EOS_ID in row else row for row in out]


def test_greedy_generate_equals_ours_including_a_left_padded_batch(models, tokenizer, capsys):
    from andy_dist.commands.generate import main as generate_main
    from andy_dist.infer.generate import generate
    from andy_dist.infer.model_file import load_model_file
    from andy_dist.infer.token_sampling import SamplingConfig

    path, hf_dir = models["untied"]
    ours, _, _ = load_model_file(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    greedy = SamplingConfig(temperature=0.0)
    want = generate(ours, [tokenizer.encode(p, bos=True) for p in PROMPTS], 40, greedy)
    assert any(len(w) == 40 for w in want) and len({tuple(w) for w in want}) > 1  # not one degenerate loop
    assert _hf_greedy(hf, hf_tok, PROMPTS, 40) == want  # one left-padded batch of four lengths
    assert [_hf_greedy(hf, hf_tok, [p], 40)[0] for p in PROMPTS] == want
    assert generate_main([str(path), *sum((["--prompt", p] for p in PROMPTS), []), "--max-new-tokens", "40",
                          "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    for prompt, tokens in zip(PROMPTS, want):
        assert f"=== {prompt}\n{prompt}{hf_tok.decode(tokens, skip_special_tokens=True)}\n" in printed
    pipe = transformers.pipeline("text-generation", model=str(hf_dir))
    text = pipe(PROMPTS[0], max_new_tokens=40, do_sample=False, return_full_text=False)[0]["generated_text"]
    assert text == tokenizer.decode(want[0])


def test_perplexity_on_the_validation_split_equals_evaluate(models, train_shards, tokenizer, capsys):
    from andy_dist.commands.evaluate import main as evaluate_main
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.stream import ValStream

    path, hf_dir = models["tied"]
    assert evaluate_main([str(path), "--data", str(train_shards), "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    loss_sum, count = 0.0, 0
    for mb in ValStream(open_shards(train_shards), rank=0, world_size=1, micro_batch_size=8, max_seq_len=128):
        pad_column = torch.full((mb.input_ids.shape[0], 1), PAD_ID)
        labels = torch.cat([torch.full_like(pad_column, -100), mb.targets.masked_fill(mb.targets == PAD_ID, -100)], 1)
        with torch.no_grad():  # transformers shifts the labels itself: position t is scored on labels[t + 1]
            out = hf(torch.cat([mb.input_ids, pad_column], 1), attention_mask=torch.cat([mb.attention_mask,
                     torch.zeros_like(pad_column)], 1), labels=labels)
        n = int((labels != -100).sum())
        loss_sum, count = loss_sum + float(out.loss) * n, count + n
    assert count == ours["target_tokens"] > 1000
    assert math.exp(loss_sum / count) == pytest.approx(ours["perplexity"], rel=1e-5)


def _tensors(hf_dir) -> dict:
    return load_file(str(hf_dir / "model.safetensors"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_import_export_gives_identical_tensors(models, dtype, tmp_path):
    from andy_dist.commands.import_hf import main as import_main
    from andy_dist.infer.model_file import read_float_weights

    path, _ = models["untied"]
    first, second = tmp_path / "first", tmp_path / "second"
    assert export_main("--hf", first, "--from", path, "--dtype", dtype) == 0
    assert import_main([str(first), "--out", str(tmp_path / "imported.andy")]) == 0
    assert export_main("--hf", second, "--from", tmp_path / "imported.andy", "--dtype", dtype) == 0
    a, b = _tensors(first), _tensors(second)
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    config = [json.loads((d / "config.json").read_text()) for d in (first, second)]
    assert config[0] == config[1]
    for name in ("tokenizer.json", "tokenizer.model", "generation_config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    state, cfg, _, _ = read_float_weights(tmp_path / "imported.andy")
    original, original_cfg, _, _ = read_float_weights(path)
    # fp32: the exact sinusoid is recognised; bf16: the rounded table is kept as given, a stored table.
    assert cfg.position_table == ("sinusoidal" if dtype == "fp32" else "stored")
    assert cfg.replace(position_table="sinusoidal") == original_cfg
    if dtype == "fp32":
        assert all(torch.equal(state[k], original[k]) for k in original)


@pytest.fixture(scope="module")
def foreign_gpt2(tokenizer, tmp_path_factory):
    """A GPT-2 made by transformers: learned (random) position table of 1,024 rows, gelu_new, tied head."""
    torch.manual_seed(3)
    config = transformers.GPT2Config(vocab_size=tokenizer.vocab_size, n_positions=1024, n_embd=64, n_layer=2,
                                     n_head=4, activation_function="gelu_new")
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        model.transformer.wpe.weight.normal_(0, 0.5)
    directory = tmp_path_factory.mktemp("gpt2") / "gpt2"
    model.save_pretrained(str(directory))
    (directory / "tokenizer.model").write_bytes(tokenizer.model_bytes)  # ours: its vocabulary size
    return model, directory


def test_a_gpt2_from_transformers_imports_with_its_position_table_kept_as_given(foreign_gpt2, builtin_corpus,
                                                                                tokenizer, tmp_path):
    from andy_dist.infer.hf_import import import_hf_model

    model, directory = foreign_gpt2
    imported = import_hf_model(directory)
    cfg = imported.cfg
    assert (cfg.position_table, cfg.activation, cfg.max_seq_len) == ("stored", "gelu_tanh", 512) and cfg.tie_embeddings
    assert any("1024" in note for note in imported.notes)
    ours = AndyLM(cfg.replace(dropout=0.0)).eval()
    ours.load_state_dict(imported.state)
    assert torch.equal(ours.positions, model.transformer.wpe.weight[:512])
    ids = real_text_ids(builtin_corpus, tokenizer, 300)
    with torch.no_grad():
        assert (ours(ids).logits - model(ids).logits).abs().max() < 1e-5
    assert export_main("--hf", tmp_path / "again", "--from", _save(imported, tmp_path / "imported.andy")) == 0
    again = _tensors(tmp_path / "again")
    assert torch.equal(again["transformer.wpe.weight"], model.transformer.wpe.weight[:512])


def _save(imported, path):
    from andy_dist.infer.model_file import save_model_file

    return save_model_file(path, imported.state, imported.cfg, imported.tokenizer, "fp32")


def test_int8_model_file_needs_dequantize_and_then_holds_the_dequantized_weights(models, tmp_path):
    from andy_dist.infer.model_file import read_float_weights, read_model_file, save_model_file
    from andy_dist.infer.quantize import dequantize_tensor

    path, _ = models["untied"]
    state, cfg, tok, _ = read_float_weights(path)
    int8 = save_model_file(tmp_path / "int8.andy", state, cfg, tok, "int8")
    with pytest.raises(UserError, match="int8.*--dequantize"):
        export_main("--hf", tmp_path / "out", "--from", int8)
    assert not (tmp_path / "out").exists()
    assert export_main("--hf", tmp_path / "out", "--from", int8, "--dequantize") == 0
    stored, _ = read_model_file(int8)
    got = _tensors(tmp_path / "out")
    want = dequantize_tensor(stored["blocks.0.attn.qkv.weight"], stored["blocks.0.attn.qkv.weight.scale"])
    assert torch.equal(got["transformer.h.0.attn.c_attn.weight"], want.t())


def test_model_card_and_generation_config(models):
    path, hf_dir = models["untied"]
    card = (hf_dir / "README.md").read_text()
    params = AndyLM(ModelConfig(vocab_size=2000, d_model=64, n_heads=4, n_layers=2, max_seq_len=128)).num_parameters()
    assert "library_name: transformers" in card and f"{params:,}" in card and "2,000" in card
    assert f"model file {path}" in card and "120 optimizer steps" in card
    generation = transformers.GenerationConfig.from_pretrained(hf_dir)
    assert (generation.bos_token_id, generation.eos_token_id, generation.pad_token_id) == (2, 3, 0)
    assert generation.do_sample and 0 < generation.temperature <= 1


def test_ensemble_perplexity_is_that_of_the_mean_distribution(models, train_shards, capsys):
    """The ensemble scores the mean of the members' probabilities: checked against a float64 computation from
    the members' own logits, and never worse than the members' mean loss (Jensen's inequality)."""
    from andy_dist.commands.evaluate import main as evaluate_main
    from andy_dist.data.shard_reader import open_shards
    from andy_dist.data.stream import ValStream
    from andy_dist.infer.model_file import load_model_file

    paths = [models["untied"][0], models["tied"][0]]
    assert evaluate_main([str(paths[0]), "--ensemble", str(paths[1]), "--data", str(train_shards), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    members, ensemble = result["members"], result["ensemble"]
    assert ensemble["loss"] <= sum(m["loss"] for m in members) / 2
    loaded = [load_model_file(p)[0] for p in paths]
    total, count = 0.0, 0
    for mb in ValStream(open_shards(train_shards), rank=0, world_size=1, micro_batch_size=8, max_seq_len=128):
        with torch.no_grad():
            probs = [m(mb.input_ids, attention_mask=mb.attention_mask).logits.double().softmax(-1) for m in loaded]
        real = mb.targets != PAD_ID
        picked = (sum(probs) / 2).gather(-1, mb.targets[..., None])[..., 0][real]
        total, count = total - float(picked.log().sum()), count + int(real.sum())
    assert ensemble["target_tokens"] == count
    assert ensemble["loss"] == pytest.approx(total / count, rel=1e-6)


def test_a_failed_export_leaves_nothing_and_force_replaces_only_when_finished(models, tmp_path, monkeypatch):
    import andy_dist.infer.hf_export as hf_export

    path, _ = models["untied"]

    def crash(*_args, **_kwargs):
        raise RuntimeError("simulated crash while writing the tokenizer")

    monkeypatch.setattr(hf_export, "save_hf_tokenizer", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        export_main("--hf", tmp_path / "new", "--from", path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no OUT, no temporary folder
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "config.json").write_text("the previous export")
    with pytest.raises(RuntimeError, match="simulated"):
        export_main("--hf", previous, "--from", path, "--force")
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    assert [p.name for p in previous.iterdir()] == ["config.json"]
    assert (previous / "config.json").read_text() == "the previous export"
    monkeypatch.undo()
    assert export_main("--hf", previous, "--from", path, "--force") == 0
    assert [p.name for p in tmp_path.iterdir()] == ["previous"]
    assert json.loads((previous / "config.json").read_text())["model_type"] == "gpt2"
