"""The single-file model format (`model.andy`): one safetensors file, loadable without pickle.

Tensors: the weights in stored form (float, or int8 + `NAME.scale` rows, see `andy_dist.infer.quantize`)
and `tokenizer.model`, the SentencePiece model bytes as a uint8 tensor.
Metadata (safetensors' string map), every value JSON or plain text:

    format          "andy-model"                 (anything else: not a model file)
    format_version  "1"                          (a higher one: written by a newer andy_dist)
    model_config    ModelConfig.to_dict()
    special_ids     {"pad": 0, "unk": 1, "bos": 2, "eos": 3}
    quantization    {"scheme": "none" | "int8-per-channel-symmetric", "float_dtype": "fp32"|"bf16"|"fp16",
                     "embeddings_quantized": bool}
    source          the checkpoint's identity: path, tag, step, ZeRO stage, ranks, precision
    tokenizer_sha256
    content_sha256  sha256 over every tensor (name, dtype, shape, bytes, in name order) and the
                    other metadata: a flipped byte anywhere is caught on load.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UserError
from andy_dist.cli import atomic_path
from andy_dist.config import ModelConfig
from andy_dist.data.tokenizer import Tokenizer
from andy_dist.infer.quantize import (
    SCALE_SUFFIX,
    SCHEME,
    Int8Linear,
    dequantize_tensor,
    prepare_int8,
    quantize_state_dict,
    swap_int8_linears,
)
from andy_dist.model import AndyLM, sinusoidal_table

FORMAT = "andy-model"
FORMAT_VERSION = 1
TOKENIZER_KEY = "tokenizer.model"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SPECIAL_IDS = {"pad": PAD_ID, "unk": UNK_ID, "bos": BOS_ID, "eos": EOS_ID}


def content_digest(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    h.update(json.dumps({k: v for k, v in metadata.items() if k != "content_sha256"}, sort_keys=True).encode())
    return h.hexdigest()


def save_model_file(
    path: str | Path,
    state: dict[str, torch.Tensor],
    cfg: ModelConfig,
    tokenizer: Tokenizer,
    dtype: str = "int8",
    source: Optional[dict] = None,
    quantize_embeddings: bool = True,
) -> Path:
    """Write `state` (fp32 AndyLM weights) as one model file; dtype "int8", "fp32", "bf16" or "fp16"."""
    if dtype not in ("int8", *DTYPES):
        raise UserError(f"unknown export dtype {dtype!r}; choose --int8, --fp32, --bf16 or --fp16")
    if tokenizer.vocab_size != cfg.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} pieces but the model {cfg.vocab_size}: "
                        f"export with the run's own tokenizer.model")
    if dtype == "int8":
        tensors = quantize_state_dict(state, include_embeddings=quantize_embeddings, tied=cfg.tie_embeddings)
        quant = {"scheme": SCHEME, "float_dtype": "fp32", "embeddings_quantized": quantize_embeddings}
    else:
        tied = cfg.tie_embeddings
        tensors = {k: v.detach().to(DTYPES[dtype]).contiguous() for k, v in state.items()
                   if not (tied and k == "lm_head.weight")}
        quant = {"scheme": "none", "float_dtype": dtype, "embeddings_quantized": False}
    tensors[TOKENIZER_KEY] = torch.frombuffer(bytearray(tokenizer.model_bytes), dtype=torch.uint8)
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "model_config": json.dumps(cfg.to_dict(), sort_keys=True),
        "special_ids": json.dumps(SPECIAL_IDS, sort_keys=True),
        "quantization": json.dumps(quant, sort_keys=True),
        "source": json.dumps(source or {}, sort_keys=True),
        "tokenizer_sha256": tokenizer.sha256,
    }
    metadata["content_sha256"] = content_digest(tensors, metadata)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return Path(path)


def read_header(path: str | Path) -> tuple[dict, dict]:
    """(tensor index, metadata) of a model file, checking it is complete, ours, and not from the future."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"model file {path} is a directory; pass the .andy file written by tools/export.py")
    if not path.is_file():
        raise UserError(f"model file {path} does not exist; make one with tools/export.py")
    size = path.stat().st_size
    not_model = f"{path} is not an andy model file (expected a .andy written by tools/export.py)"
    with open(path, "rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise UserError(f"{not_model}: only {size} bytes")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > 100_000_000:
            raise UserError(f"{not_model}: no safetensors header")
        if 8 + header_len > size:
            raise UserError(f"{path} is truncated: its header needs {8 + header_len} bytes, the file has {size}; "
                            f"export it again")
        try:
            header = json.loads(handle.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{not_model}: no safetensors header") from None
    if not isinstance(header, dict):
        raise UserError(f"{not_model}: no safetensors header")
    metadata = header.pop("__metadata__", None) or {}
    if metadata.get("format") != FORMAT:
        raise UserError(f"{not_model}: a safetensors file without andy metadata")
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise UserError(f"{path} has an unreadable format_version {metadata.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise UserError(f"{path} has format version {version}, newer than this andy_dist reads ({FORMAT_VERSION}); "
                        f"upgrade andy_dist")
    data_len = max((entry["data_offsets"][1] for entry in header.values()), default=0)
    if 8 + header_len + data_len > size:
        raise UserError(f"{path} is truncated: {size} bytes of {8 + header_len + data_len}; export it again")
    return header, metadata


def read_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(stored tensors, decoded metadata) after checking the file's integrity."""
    _, metadata = read_header(path)
    try:
        tensors = load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors' own error types vary by version
        raise UserError(f"{path} is damaged: {err}") from None
    if content_digest(tensors, metadata) != metadata.get("content_sha256"):
        raise UserError(f"{path} was altered or corrupted after export (content checksum mismatch); export it again")
    info = {k: metadata[k] for k in ("format", "tokenizer_sha256")}
    info["format_version"] = int(metadata["format_version"])
    for key in ("model_config", "special_ids", "quantization", "source"):
        info[key] = json.loads(metadata[key])
    if info["special_ids"] != SPECIAL_IDS:
        raise UserError(f"{path} uses special ids {info['special_ids']}, this andy_dist {SPECIAL_IDS}")
    return tensors, info


def build_model(tensors: dict[str, torch.Tensor], info: dict, device="cpu", dtype=None, int8_kernel="auto") -> AndyLM:
    """An eval-mode AndyLM from stored tensors; int8 layers become `Int8Linear`."""
    cfg = ModelConfig.from_dict(info["model_config"]).replace(dropout=0.0)
    quantized = info["quantization"]["scheme"] != "none"
    if dtype is None:
        dtype = DTYPES[info["quantization"]["float_dtype"]]
        if quantized and torch.device(device).type == "cuda":
            dtype = torch.bfloat16
    with torch.device("meta"):
        model = AndyLM(cfg, init_weights=False)
    weights = {k: v for k, v in tensors.items() if k != TOKENIZER_KEY}
    if quantized:
        swap_int8_linears(model, weights, int8_kernel)
        if "embed.weight" + SCALE_SUFFIX in weights:
            q, scale = weights.pop("embed.weight"), weights.pop("embed.weight" + SCALE_SUFFIX)
            weights["embed.weight"] = dequantize_tensor(q, scale)
            if cfg.tie_embeddings:  # the head reads the same int8 rows
                model.lm_head = Int8Linear(q, scale, None, int8_kernel)
        weights = {k: v for k, v in weights.items()
                   if not k.endswith(SCALE_SUFFIX) and not isinstance(_owner(model, k), Int8Linear)}
    if cfg.tie_embeddings and "lm_head.weight" not in weights and not isinstance(model.lm_head, Int8Linear):
        weights["lm_head.weight"] = weights["embed.weight"]
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    missing = [k for k in missing if not isinstance(_owner(model, k), Int8Linear)]
    if missing or unexpected:
        raise UserError(f"model file does not match its model_config: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
    if cfg.tie_embeddings and not isinstance(model.lm_head, Int8Linear):
        model.lm_head.weight = model.embed.weight
    if cfg.position_table == "sinusoidal":  # not saved: computed again (a stored table came with the weights)
        model.positions = sinusoidal_table(cfg.max_seq_len, cfg.d_model)
    model = model.to(device=device, dtype=dtype).eval()
    prepare_int8(model, dtype)  # kernel choice and weight packing at load time, not in the first step
    return model


def _owner(model: torch.nn.Module, key: str) -> torch.nn.Module:
    module_name = key.rpartition(".")[0]
    return model.get_submodule(module_name) if module_name else model


def load_model_file(path: str | Path, device="cpu", dtype=None, int8_kernel: str = "auto"):
    """(model, tokenizer, info) from a .andy file; info holds the decoded metadata and file size.

    dtype: the float compute dtype; by default the export's (fp32 for int8 files on CPU, bf16 on CUDA).
    """
    tensors, info = read_model_file(path)
    tokenizer = Tokenizer(tensors[TOKENIZER_KEY].numpy().tobytes(), source=f"{path}:{TOKENIZER_KEY}")
    if tokenizer.sha256 != info["tokenizer_sha256"]:
        raise UserError(f"{path}: the embedded tokenizer does not match its recorded sha256")
    model = build_model(tensors, info, device=device, dtype=dtype, int8_kernel=int8_kernel)
    info["file_bytes"] = Path(path).stat().st_size
    info["path"] = str(path)
    return model, tokenizer, info


def read_float_weights(path: str | Path, dequantize: bool = False) -> tuple[dict[str, torch.Tensor], ModelConfig,
                                                                           Tokenizer, dict]:
    """(fp32 state dict as `AndyLM.state_dict()`, config, tokenizer, info) of a model file, for re-export.

    An int8 file is refused unless `dequantize`: its weights then carry the int8 rounding into the float copy.
    """
    tensors, info = read_model_file(path)
    tokenizer = Tokenizer(tensors.pop(TOKENIZER_KEY).numpy().tobytes(), source=f"{path}:{TOKENIZER_KEY}")
    cfg = ModelConfig.from_dict(info["model_config"])
    if info["quantization"]["scheme"] != "none" and not dequantize:
        raise UserError(f"{path} holds int8 weights; pass --dequantize to export them as floats (the int8 "
                        f"rounding stays in them), or export from the training checkpoint instead")
    state = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        state[name] = dequantize_tensor(tensor, scale) if scale is not None else tensor.float()
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    return state, cfg, tokenizer, info
