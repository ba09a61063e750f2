#!/usr/bin/env bash
# The GPU-only checks in one pass, figures written under $OUT (or ./gpu_out):
#   1. pytest -m gpu: fp16 + dynamic loss scaling on tiny; medium at seq 512 under an 8 GiB cap; FLOP counter on CUDA
#   2. medium, bf16, through the DeepSpeed engine on one GPU: tokens/s and MFU
#   3. generation tokens/s, medium, bf16 and int8, batch 1/8/64, decode eager / CUDA graph / torch.compile,
#      into $OUT/generate_gpu.json, plus a profile of one decode step eager and replayed (DEVICE=cpu: a dry run)
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
    tests/unit/infer/test_decode_compile.py \
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
GEN_DEVICE=${DEVICE:-cuda}
BY_MODE=$([ "$GEN_DEVICE" = cpu ] && echo --by-mode)   # the same table on CPU: a dry run of this step
# Eager and CUDA graph at every batch size (a capture costs milliseconds), then torch.compile (Inductor, seconds
# per shape) on fewer; one JSON with both.
timeout -k 10 ${GEN_TIMEOUT:-150} $PY tools/bench.py generate --device $GEN_DEVICE $BY_MODE --size ${GEN_SIZE:-medium} \
    --skip-shed --batch-sizes ${GEN_BATCHES:-1,8,64} --new-tokens ${GEN_TOKENS:-128} \
    --compile-modes ${GEN_MODES:-off,cudagraph} --out "$OUTDIR/generate_gpu.json" 2>&1 | tail -n 6
timeout -k 10 ${GEN_INDUCTOR_TIMEOUT:-240} $PY tools/bench.py generate --device $GEN_DEVICE $BY_MODE \
    --size ${GEN_SIZE:-medium} --skip-shed --batch-sizes ${GEN_INDUCTOR_BATCHES:-1,64} --new-tokens ${GEN_TOKENS:-128} \
    --compile-modes inductor --out "$OUTDIR/generate_gpu_inductor.json" 2>&1 | tail -n 6
$PY - "$OUTDIR" <<'PYEOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
figures = json.loads((out / "generate_gpu.json").read_text()) if (out / "generate_gpu.json").exists() else {}
inductor = out / "generate_gpu_inductor.json"
if inductor.exists():
    figures["inductor"] = json.loads(inductor.read_text())
    inductor.unlink()
(out / "generate_gpu.json").write_text(json.dumps(figures, indent=2) + "\n")
print("generate_gpu.json:", sorted(next(iter(figures.values()), {}).keys()) if figures else "missing")
PYEOF
GEN_DEVICE=$GEN_DEVICE GEN_SIZE=${GEN_SIZE:-medium} timeout 90 $PY - <<'PYEOF' 2>&1 | tee "$OUTDIR/decode_profile.txt" | tail -n 30
import os, time, torch
from torch.profiler import profile, ProfilerActivity
from andy_dist.config import model_config
from andy_dist.model import AndyLM
from andy_dist.infer.generate import generate
from andy_dist.infer.token_sampling import SamplingConfig
device = os.environ["GEN_DEVICE"]
cuda = device.startswith("cuda")
dtype = torch.bfloat16 if cuda else torch.float32
model = AndyLM(model_config(os.environ["GEN_SIZE"], dropout=0.0)).eval().to(device=device, dtype=dtype)
prompt = [list(range(4, 20))]
greedy = SamplingConfig(temperature=0.0)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
key = "cuda_time_total" if cuda else "cpu_time_total"
for mode in ["off", "cudagraph"] if cuda else ["off"]:
    for _ in range(2):
        generate(model, prompt, 64, greedy, eos_id=-1, compile=mode)
    if cuda: torch.cuda.synchronize()
    start = time.perf_counter(); generate(model, prompt, 64, greedy, eos_id=-1, compile=mode)
    if cuda: torch.cuda.synchronize()
    print(f"{dtype} batch 1, decode {mode}, after 2 warm-ups: {64 / (time.perf_counter() - start):.1f} tok/s")
    with profile(activities=acts) as prof:
        generate(model, prompt, 16, greedy, eos_id=-1, compile=mode)
    print(prof.key_averages().table(sort_by=key, row_limit=12, max_name_column_width=50))
PYEOF
stamp "4. vocabulary head: full vs chunked loss, padded vs unpadded rows"
timeout -k 10 ${MEM_TIMEOUT:-180} $PY tools/bench.py memory --device ${DEVICE:-cuda} --dtype bf16 --batch 16 --seq-len 512 \
    --chunks 1024 2048 4096 8192 --reps 5 --step-sizes medium --step-batch 16 --step-seq-len 512 \
    --out "$OUTDIR/vocab_memory_gpu.json" 2>&1 | tail -n 4
stamp "done"
