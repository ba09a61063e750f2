"""Our SentencePiece BPE as a Hugging Face fast tokenizer (`tokenizer.json`) that gives exactly our ids.

SentencePiece's BPE encodes by merging, again and again, the adjacent pair whose merged piece has the highest
score. A `tokenizers` BPE model does the same when its merge list holds every pair of pieces (a, b) whose
concatenation is a piece, ranked by that piece's score (then id): that is the list built here, from the pieces
and scores in the .model file. Our tokenizers are trained with identity normalisation, no dummy prefix and no
whitespace removal (`andy_dist.data.tokenizer.train_tokenizer`), so the only normalisation left is
SentencePiece's escaping of " " as "▁", and decoding undoes it. "\\n" is a user-defined piece: SentencePiece
emits it whole and never merges across it, which is what an added token does. Characters without a piece
become <0xXX> byte pieces in both (byte fallback), and the decoder turns them back into UTF-8.

[PAD] [UNK] [BOS] [EOS] (ids 0-3) are registered as special tokens. SentencePiece never reads them from text,
so the exported tokenizer does not either (`split_special_tokens`): "[BOS]" typed in a prompt is five pieces
in both. `tokenizer(text)` prepends BOS, as our generator does with prompts; `add_special_tokens=False` gives
the bare ids. Prompts are padded on the left, as batched generation needs.

Written here rather than taken from `transformers.convert_slow_tokenizer`, whose SentencePiece converters
differ between transformers versions (dummy prefix, `legacy`, whitespace handling): this file is the same
for every version that reads tokenizer.json. `tests/unit/infer/test_hf_tokenizer.py` proves the equality on the
corpora rather than trusting this argument.
"""

from __future__ import annotations

import json
from pathlib import Path

from andy_dist import BOS_ID, EOS_ID, PAD_ID, UNK_ID, UserError
from andy_dist.data.tokenizer import SPECIAL_PIECES, Tokenizer

# SentencePiece ModelProto piece types.
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4
_BPE = 2
SPECIAL_TOKENS = {"pad_token": SPECIAL_PIECES["pad"], "unk_token": SPECIAL_PIECES["unk"],
                  "bos_token": SPECIAL_PIECES["bos"], "eos_token": SPECIAL_PIECES["eos"]}
SPECIAL_IDS = {"pad_token_id": PAD_ID, "unk_token_id": UNK_ID, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID}


def _model_proto(tokenizer: Tokenizer):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_bytes)
    spec = proto.normalizer_spec
    settings = {"BPE": proto.trainer_spec.model_type == _BPE, "identity normalisation": not spec.precompiled_charsmap,
                "no dummy prefix": not spec.add_dummy_prefix, "whitespace kept": not spec.remove_extra_whitespaces,
                "spaces escaped": spec.escape_whitespaces, "byte fallback": proto.trainer_spec.byte_fallback}
    missing = [name for name, ok in settings.items() if not ok]
    if missing:
        raise UserError(f"this tokenizer was not trained by tools/train_tokenizer.py (it lacks: {', '.join(missing)}); "
                        f"the Hugging Face export reproduces only our BPE settings")
    return proto


def _merges(proto) -> list[tuple[str, str]]:
    """Every pair of normal pieces whose concatenation is a normal piece, best-scoring result first."""
    normal = {p.piece: (p.score, i) for i, p in enumerate(proto.pieces) if p.type == _NORMAL}
    ranked = []
    for piece, (score, index) in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-score, index, normal[left][1], left, right))
    return [(left, right) for *_, left, right in sorted(ranked)]


def fast_tokenizer(tokenizer: Tokenizer):
    """A `tokenizers.Tokenizer` that encodes and decodes exactly like `tokenizer`."""
    from tokenizers import AddedToken, decoders, models, normalizers, processors
    from tokenizers import Tokenizer as FastTokenizer

    proto = _model_proto(tokenizer)
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    fast = FastTokenizer(models.BPE(vocab=vocab, merges=_merges(proto), unk_token=SPECIAL_PIECES["unk"],
                                    fuse_unk=True, byte_fallback=True))
    fast.normalizer = normalizers.Replace(" ", "▁")
    fast.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fast.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                             for p in proto.pieces if p.type == _CONTROL])
    fast.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                     for p in proto.pieces if p.type == _USER_DEFINED])
    bos, eos = SPECIAL_PIECES["bos"], SPECIAL_PIECES["eos"]
    fast.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {eos} {bos} $B",
                                                        special_tokens=[(bos, BOS_ID), (eos, EOS_ID)])
    fast.encode_special_tokens = True
    return fast


def save_hf_tokenizer(tokenizer: Tokenizer, out_dir: str | Path, max_len: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and the original tokenizer.model."""
    from transformers import PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=fast_tokenizer(tokenizer), model_max_length=max_len,
                                      padding_side="left", split_special_tokens=True,
                                      clean_up_tokenization_spaces=False, **SPECIAL_TOKENS)
    wrapped.save_pretrained(str(out_dir))
    # The generic class every transformers version knows (5.x writes its new name, which 4.x cannot read).
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out_dir / "tokenizer.model").write_bytes(tokenizer.model_bytes)
