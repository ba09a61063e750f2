"""Import a Hugging Face GPT-2 directory (one exported by andy-export --hf, or any GPT-2-style model) as an
fp32 model file, to fine-tune from, generate with or evaluate.

    andy-import-hf HF_DIR --out model.andy [--tokenizer DIR/tokenizer.model]      (or: python tools/import_hf.py)
    andy-train --ds_config ds_configs/tiny.json --data shards/NAME --out runs/FT init_from=model.andy

`init_from=` also takes HF_DIR itself. The model's shape comes from its config.json; a learned position
embedding is kept exactly as given and never trained. The tokenizer is the directory's tokenizer.model (our
export writes it) or --tokenizer: one of ours with the model's vocabulary size, the one its shards use.
"""

import argparse

from andy_dist.cli import run_tool


def main(argv=None) -> int:
    from andy_dist.cli import check_output_path
    from andy_dist.infer.hf_import import import_hf_model
    from andy_dist.infer.model_card import parameter_count
    from andy_dist.infer.model_file import save_model_file

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("hf_dir", help="a Hugging Face model directory (config.json, model.safetensors)")
    parser.add_argument("-o", "--out", required=True, help="the model file to write, e.g. runs/FT/init.andy")
    parser.add_argument("--tokenizer", help="tokenizer.model (default: the one in HF_DIR)")
    args = parser.parse_args(argv)

    check_output_path(args.out, "--out")
    imported = import_hf_model(args.hf_dir, tokenizer=args.tokenizer)
    path = save_model_file(args.out, imported.state, imported.cfg, imported.tokenizer, dtype="fp32",
                           source=imported.source)
    cfg = imported.cfg
    for note in imported.notes:
        print(f"note: {note}")
    print(f"wrote {path} (fp32, {parameter_count(cfg):,} parameters: d_model {cfg.d_model}, {cfg.n_heads} heads, "
          f"{cfg.n_layers} layers, vocab {cfg.vocab_size}, positions {cfg.position_table}) from {args.hf_dir}")
    print(f"fine-tune it: andy-train --ds_config ds_configs/CONFIG.json --data shards/NAME --out runs/NAME "
          f"init_from={path}")
    return 0


def run() -> None:
    run_tool(main)
