#!/usr/bin/env bash
# The GPU-only checks in one pass, figures written under $OUT (or ./gpu_out):
#   1. pytest -m gpu: fp16 + dynamic loss scaling on tiny; medium at seq 512 under an 8 GiB cap; FLOP counter on CUDA
#   2. medium, bf16, through the DeepSpeed engine on one GPU: tokens/s and MFU
#   3. generation tokens/s, medium, bf16 and int8, batch 1/8/64, plus a profile of bf16 decode
#   4. the vocabulary: peak memory and time of the medium head's loss at 16 x 512, full logits vs chunked;
#      step time padded (50,048 rows) vs unpadded, chunked vs full (tools/bench.py memory)
# On a machine without network: bash ../shared/device/wheelhouse.sh here first, carry .whl and .device.
set -uo pipefail
cd "$(dirname "$0")/.."
OUTDIR=${OUT:-gpu_out}
mkdir -p "$OUTDIR"
if [ -f .device/prelude.sh ] && [ -z "${NO_PRELUDE:-}" ]; then source .device/prelude.sh || exit 1; fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
WORK=${WORK:-/tmp/andy_gpu}
mkdir -p "$WORK"
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; }

stamp "1. GPU tests"
timeout -k 10 ${PYTEST_TIMEOUT:-240} $PY -m pytest -q -m gpu -p no:cacheprovider tests/e2e/test_gpu.py tests/unit/train/test_flops.py \
    2>&1 | tee "$OUTDIR/pytest_gpu.log" | tail -n 15

stamp "2. medium bf16 through the engine"
$PY tools/default_corpus.py --out "$WORK/corpus.jsonl" --max-mb 3 >/dev/null
$PY tools/train_tokenizer.py --input "$WORK/corpus.jsonl" --vocab-size 8000 --out "$WORK/tok" 2>/dev/null
$PY tools/make_shards.py --input "$WORK/corpus.jsonl" --tokenizer "$WORK/tok/tokenizer.model" --out "$WORK/shards" \
    --val-fraction 0.02 --max-seq-len 512 --workers 4 2>/dev/null | tail -n 3
for stage in ${STAGES:-2 0}; do   # the shipped ZeRO-2 and plain data parallel, to see what ZeRO costs on one GPU
    timeout -k 30 ${TRAIN_TIMEOUT:-150} $PY launch/train.py --ds_config ${DS:-ds_configs/medium.json} --data "$WORK/shards" \
        --tokenizer "$WORK/tok/tokenizer.model" --out "$WORK/medium$stage" --max-steps ${MEDIUM_STEPS:-40} \
        micro_batch_size=${MICRO:-16} global_batch_size=${GLOBAL:-16} log_interval=10 save_interval=100000 \
        warmup_steps=10 zero_stage=$stage num_workers=2 'sample_prompts=["def "]' sample_max_new_tokens=16 2>&1 \
        | grep -E "^(step|launcher|precision|global|mfu|done)" | tee "$OUTDIR/medium_bf16_zero$stage.log"
    cp "$WORK/medium$stage/metrics.jsonl" "$OUTDIR/medium_bf16_zero${stage}_metrics.jsonl" 2>/dev/null
done

stamp "3. generation speed"
timeout -k 10 ${GEN_TIMEOUT:-150} $PY tools/bench.py generate --device ${DEVICE:-cuda} --skip-quality \
    --batch-sizes ${GEN_BATCHES:-1,8,64} --new-tokens ${GEN_TOKENS:-128} --out "$OUTDIR/generate_gpu.json" 2>&1 | tail -n 12
timeout 60 $PY - <<'PYEOF' 2>&1 | tee "$OUTDIR/decode_profile.txt" | tail -n 25
import torch, time
from torch.profiler import profile, ProfilerActivity
from andy_dist.config import model_config
from andy_dist.model import AndyLM
from andy_dist.infer.generate import generate
from andy_dist.infer.token_sampling import SamplingConfig
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.bfloat16 if device == "cuda" else torch.float32
model = AndyLM(model_config("medium", dropout=0.0)).eval().to(device=device, dtype=dtype)
prompt = [list(range(4, 20))]
greedy = SamplingConfig(temperature=0.0)
for _ in range(2):
    generate(model, prompt, 32, greedy, eos_id=-1)
if device == "cuda": torch.cuda.synchronize()
start = time.perf_counter(); generate(model, prompt, 64, greedy, eos_id=-1)
if device == "cuda": torch.cuda.synchronize()
print(f"bf16 batch 1 after 2 warm-ups: {64 / (time.perf_counter() - start):.1f} tok/s")
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
with profile(activities=acts) as prof:
    generate(model, prompt, 16, greedy, eos_id=-1)
key = "cuda_time_total" if device == "cuda" else "cpu_time_total"
print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))
PYEOF
stamp "4. vocabulary head: full vs chunked loss, padded vs unpadded rows"
timeout -k 10 ${MEM_TIMEOUT:-180} $PY tools/bench.py memory --device ${DEVICE:-cuda} --dtype bf16 --batch 16 --seq-len 512 \
    --chunks 1024 2048 4096 8192 --reps 5 --step-sizes medium --step-batch 16 --step-seq-len 512 \
    --out "$OUTDIR/vocab_memory_gpu.json" 2>&1 | tail -n 4
stamp "done"
