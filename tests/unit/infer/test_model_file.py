"""The one-file model format: round trips, and every bad-file case a clear UserError."""

import json
import struct

import pytest
import torch
from safetensors.torch import save_file

from andy_dist import UserError
from andy_dist.infer.model_file import FORMAT_VERSION, load_model_file, read_header, save_model_file
from andy_dist.model import AndyLM


@pytest.fixture(scope="module")
def trained(trained_tiny):
    """A small model really trained (200 steps on the built-in corpus, tests/tiny_training.py): quantization
    meets the weights training makes, not those of an initialisation."""
    assert trained_tiny.losses[-1] < trained_tiny.losses[0] - 2.0
    return trained_tiny.model(), trained_tiny.cfg


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.mark.parametrize("dtype,tol", [("fp32", 0.0), ("bf16", 0.02), ("fp16", 0.005), ("int8", 0.03)])
def test_round_trip(tmp_path, trained, tokenizer, dtype, tol):
    model, cfg = trained
    path = save_model_file(tmp_path / "m.andy", model.state_dict(), cfg, tokenizer, dtype=dtype, source={"tag": "best"})
    loaded, tok, info = load_model_file(path, dtype=torch.float32)
    ids = torch.tensor([tokenizer.encode("def main():\n    return 1", bos=True)])
    ref = logits(model, ids)
    assert (logits(loaded, ids) - ref).abs().max() <= tol * ref.abs().max()
    assert tok.sha256 == tokenizer.sha256 and info["source"] == {"tag": "best"}
    assert info["model_config"] == cfg.to_dict() and info["format_version"] == FORMAT_VERSION
    assert info["quantization"]["scheme"] == ("none" if dtype != "int8" else "int8-per-channel-symmetric")
    assert not loaded.training


def test_int8_file_is_small_and_tied_heads_are_stored_once(tmp_path, trained, tokenizer):
    model, cfg = trained
    fp32 = save_model_file(tmp_path / "a.andy", model.state_dict(), cfg, tokenizer, dtype="fp32")
    int8 = save_model_file(tmp_path / "b.andy", model.state_dict(), cfg, tokenizer, dtype="int8")
    assert int8.stat().st_size <= 0.3 * fp32.stat().st_size
    torch.manual_seed(1)
    tied_cfg = cfg.replace(tie_embeddings=True)
    tied = AndyLM(tied_cfg).eval()
    path = save_model_file(tmp_path / "t.andy", tied.state_dict(), tied_cfg, tokenizer, dtype="int8")
    assert path.stat().st_size < 0.75 * int8.stat().st_size
    loaded, _, _ = load_model_file(path)
    ids = torch.tensor([[2, 100, 200, 300]])
    ref = logits(tied, ids)
    assert (logits(loaded, ids) - ref).abs().max() <= 0.03 * ref.abs().max()


@pytest.fixture()
def good_file(tmp_path, trained, tokenizer):
    model, cfg = trained
    return save_model_file(tmp_path / "good.andy", model.state_dict(), cfg, tokenizer, dtype="int8")


def test_truncated_file(good_file):
    data = good_file.read_bytes()
    for keep in (len(data) - 100, 200, 4):
        good_file.write_bytes(data[:keep])
        with pytest.raises(UserError, match="truncated|not an andy model"):
            load_model_file(good_file)


def test_altered_byte(good_file):
    data = bytearray(good_file.read_bytes())
    data[-1000] ^= 0x01
    good_file.write_bytes(bytes(data))
    with pytest.raises(UserError, match="altered or corrupted"):
        load_model_file(good_file)


def _rewrite_metadata(path, **changes):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"].update(changes)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n :])


def test_future_format_version(good_file):
    _rewrite_metadata(good_file, format_version=str(FORMAT_VERSION + 1))
    with pytest.raises(UserError, match="newer than this andy_dist"):
        load_model_file(good_file)


def test_altered_metadata_is_caught(good_file):
    _rewrite_metadata(good_file, source=json.dumps({"tag": "forged"}))
    with pytest.raises(UserError, match="altered"):
        load_model_file(good_file)


def test_non_model_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, this is not a model\n" * 10)
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, str(plain))
    pt = tmp_path / "weights.pt"
    torch.save({"w": torch.zeros(3)}, pt)
    for path in (text, plain, pt):
        with pytest.raises(UserError, match="not an andy model file"):
            read_header(path)
    with pytest.raises(UserError, match="does not exist"):
        load_model_file(tmp_path / "missing.andy")
