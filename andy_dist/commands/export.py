"""Export a training checkpoint as one model file, or as a Hugging Face directory (no DeepSpeed or GPU needed).

    andy-export --int8 runs/NAME/checkpoints [--tag best|latest|TAG] -o model.andy      (or: python tools/export.py)
    andy-export --bf16 runs/NAME/checkpoints -o model-bf16.andy                        # or --fp16 / --fp32
    andy-export --hf OUT_DIR runs/NAME/checkpoints [--tag best] [--dtype fp32|bf16|fp16] [--force]
    andy-export --hf OUT_DIR --from model.andy [--dequantize]          # an existing model file
    andy-export --fp32 runs/NAME/checkpoints --average-last 3 -o avg.andy    # mean of the last 3 step checkpoints
    andy-export --hf OUT_DIR runs/NAME/checkpoints --average step-000400 step-000500

Reads DeepSpeed checkpoints of ZeRO stages 0-3 saved by any number of ranks, in this one process.
The .andy file holds the weights (int8 + per-row scales, or float), the model config, the tokenizer, the
special ids, the quantization scheme, a format version and the checkpoint's identity. The Hugging Face
directory loads with transformers' AutoModelForCausalLM / AutoTokenizer (GPT-2 format, no custom code).
"""

import argparse

from andy_dist.cli import run_tool

DTYPE_NAMES = ("int8", "bf16", "fp16", "fp32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="?", help="runs/NAME/checkpoints (or runs/NAME)")
    parser.add_argument("--tag", help="best, latest (the default: the 'latest' file) or a tag name")
    average = parser.add_mutually_exclusive_group()
    average.add_argument("--average-last", type=int, metavar="K", help="export the mean of the last K step checkpoints")
    average.add_argument("--average", nargs="+", metavar="TAG", help="export the mean of these checkpoints")
    dtype = parser.add_mutually_exclusive_group()
    for name in DTYPE_NAMES:
        dtype.add_argument(f"--{name}", dest="dtype", action="store_const", const=name)
    dtype.add_argument("--dtype", choices=DTYPE_NAMES, help="the same as --int8 / --bf16 / --fp16 / --fp32")
    parser.add_argument("--float-embeddings", action="store_true",
                        help="with --int8: keep the embedding and LM head in fp32 (larger file)")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one in the checkpoint directory)")
    parser.add_argument("-o", "--output", help="the model file to write, e.g. model.andy")
    parser.add_argument("--hf", metavar="OUT_DIR", help="write a Hugging Face transformers directory instead")
    parser.add_argument("--from", dest="model_file", metavar="MODEL.andy", help="with --hf: convert this model file")
    parser.add_argument("--dequantize", action="store_true", help="with --from: accept an int8 file (as floats)")
    parser.add_argument("--force", action="store_true", help="with --hf: replace a non-empty OUT_DIR")
    return parser


def _check_arguments(args) -> str:
    """The export dtype, after refusing combinations that make no sense."""
    from andy_dist import UserError

    if (args.checkpoints is None) == (args.model_file is None):
        raise UserError("give either a checkpoint directory (runs/NAME/checkpoints) or --from MODEL.andy")
    if args.model_file and not args.hf:
        raise UserError("--from converts a model file to the Hugging Face format: add --hf OUT_DIR")
    if args.model_file and (args.tag or args.average or args.average_last or args.tokenizer):
        raise UserError("--tag, --average, --average-last and --tokenizer read a checkpoint, not --from MODEL.andy")
    if args.hf and args.output:
        raise UserError("give --hf OUT_DIR or -o FILE.andy, not both")
    if not args.hf and not args.output:
        raise UserError("give -o FILE.andy (or --hf OUT_DIR for the Hugging Face format)")
    if args.tag and (args.average or args.average_last):
        raise UserError("--tag chooses one checkpoint; --average / --average-last choose several: give one of them")
    dtype = args.dtype or ("fp32" if args.hf else "int8")
    if args.hf and dtype == "int8":
        raise UserError("the Hugging Face format holds float weights: use --dtype fp32, bf16 or fp16")
    return dtype


def _checkpoint_source(args):
    """(fp32 state, config, tokenizer, description) of the checkpoint(s) asked for."""
    from pathlib import Path

    from andy_dist import UserError
    from andy_dist.config import ModelConfig
    from andy_dist.data.tokenizer import Tokenizer
    from andy_dist.infer.export import describe_checkpoint, load_checkpoint_weights, logical_state_dict
    from andy_dist.infer.hf_import import is_hf_directory, read_hf_config
    from andy_dist.infer.weight_average import average_checkpoints, last_step_tags
    from andy_dist.train.checkpoint_format import TOKENIZER_FILE, read_meta, resolve_checkpoint

    if is_hf_directory(args.checkpoints) and not (Path(args.checkpoints) / "latest").exists():
        kind = read_hf_config(args.checkpoints).get("model_type") or "unknown"
        raise UserError(f"{args.checkpoints} is a Hugging Face model directory ({kind}), not an andy_dist checkpoint; "
                        f"to train from a GPT-2 model, use tools/import_hf.py or init_from=")
    tags = args.average or (last_step_tags(args.checkpoints, args.average_last) if args.average_last else None)
    ckpt, tag = resolve_checkpoint(args.checkpoints, tags[0] if tags else args.tag or "latest")
    tokenizer_path = Path(args.tokenizer) if args.tokenizer else ckpt / TOKENIZER_FILE
    if not tokenizer_path.exists():
        raise UserError(f"no tokenizer at {tokenizer_path}; pass --tokenizer DIR/tokenizer.model, the one the run "
                        f"was trained with")
    tokenizer = Tokenizer.from_file(tokenizer_path)
    trained_with = read_meta(ckpt / tag).get("tokenizer_sha256")  # before the minutes of reading the weights
    if trained_with and tokenizer.sha256 != trained_with:
        raise UserError(f"tokenizer {tokenizer_path} is not the one this checkpoint was trained with (sha256 "
                        f"differs); pass the run's tokenizer with --tokenizer")
    state, meta = average_checkpoints(ckpt, tags) if tags else load_checkpoint_weights(ckpt, tag)
    # The export holds the rows of the tokenizer's ids only: no padding, none of a larger model vocabulary.
    state, cfg = logical_state_dict(state, ModelConfig.from_dict(meta["model_config"]), tokenizer.vocab_size)
    info = describe_checkpoint(meta)
    made = f"average of {', '.join(tags)}" if tags else f"tag {meta['tag']}"
    info["made_from"] = f"checkpoint {meta['checkpoint']}, {made}"
    return state, cfg, tokenizer, info


def _model_file_source(args):
    from andy_dist.infer.model_file import read_float_weights

    state, cfg, tokenizer, file_info = read_float_weights(args.model_file, dequantize=args.dequantize)
    info = dict(file_info["source"])
    scheme = file_info["quantization"]["scheme"]
    info["made_from"] = (f"model file {args.model_file} ({file_info['quantization']['float_dtype']}"
                         f"{', int8 dequantized' if scheme != 'none' else ''})")
    return state, cfg, tokenizer, info


def _step(info: dict) -> str:
    return f", step {info['step']}" if info.get("step") is not None else ""


def main(argv=None) -> int:
    from pathlib import Path

    from andy_dist.cli import check_output_path
    from andy_dist.infer.hf_export import check_hf_output, require_transformers, write_hf_directory
    from andy_dist.infer.model_file import save_model_file

    args = build_parser().parse_args(argv)
    dtype = _check_arguments(args)
    if args.hf:  # before the minutes of reading a large checkpoint
        require_transformers()
        check_hf_output(args.hf, args.force)
    else:
        check_output_path(args.output, "-o")
    state, cfg, tokenizer, info = _model_file_source(args) if args.model_file else _checkpoint_source(args)
    if args.hf:
        out = write_hf_directory(args.hf, state, cfg, tokenizer, dtype=dtype, force=args.force,
                                 card=dict(info, path=args.hf, name=Path(args.hf).name))
        print(f"wrote {out} (Hugging Face GPT-2 format, {dtype}) from {info['made_from']}{_step(info)}")
        return 0
    source = {k: v for k, v in info.items() if k != "made_from"}
    path = save_model_file(args.output, state, cfg, tokenizer, dtype=dtype, source=source,
                           quantize_embeddings=not args.float_embeddings)
    size = path.stat().st_size / 1e6
    print(f"wrote {path} ({size:.2f} MB, {dtype}) from {info['made_from']}{_step(info)}")
    return 0


def run() -> None:
    run_tool(main)
