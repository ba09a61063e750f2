#!/usr/bin/env bash
# The main job, end to end, on the built-in corpus (Python standard library source; no download):
#   tokenizer -> shards -> DeepSpeed training on 2 ranks -> int8 export -> generated text -> report
#   bash scripts/demo.sh                 (STEPS=150 OUT=runs/demo NPROC=2 by default)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
. .venv/bin/activate
OUT=${OUT:-runs/demo}
STEPS=${STEPS:-150}
export WANDB_MODE=${WANDB_MODE:-offline} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
if python -c "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    NPROC=${NPROC:-$(python -c "import torch; print(min(2, torch.cuda.device_count()))")}; PRECISION=bf16
else
    export DS_ACCELERATOR=cpu; NPROC=${NPROC:-2}; PRECISION=fp32   # CPU matmuls are fastest in fp32
fi
mkdir -p "$OUT"
set -x
python tools/default_corpus.py --out "$OUT/corpus.jsonl" --max-mb 3
python tools/train_tokenizer.py --input "$OUT/corpus.jsonl" --vocab-size 10000 --out "$OUT/tokenizer"
python tools/model_sizes.py
python tools/make_shards.py --input "$OUT/corpus.jsonl" --tokenizer "$OUT/tokenizer/tokenizer.model" \
    --out "$OUT/shards" --val-fraction 0.03 --max-seq-len 256
deepspeed --num_gpus "$NPROC" launch/train.py --ds_config ds_configs/tiny.json --data "$OUT/shards" \
    --tokenizer "$OUT/tokenizer/tokenizer.model" --out "$OUT/run" --max-steps "$STEPS" --resume \
    precision=$PRECISION warmup_steps=30 lr=1e-3 log_interval=10 eval_interval=50 save_interval=50 \
    sample_interval=50 'sample_prompts=["def ", "import ", "class "]'
python tools/export.py --int8 "$OUT/run/checkpoints" --tag best -o "$OUT/model.andy"
python tools/evaluate.py "$OUT/model.andy" --data "$OUT/shards" --split val
python tools/generate.py "$OUT/model.andy" --prompt "def " --prompt "import os" --prompt "class " \
    --max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95 --repetition-penalty 1.1 --seed 1
python tools/report.py "$OUT/run" -o "$OUT/report.html"
set +x
echo "done: tokenizer, shards, checkpoints, $OUT/model.andy and $OUT/report.html"
