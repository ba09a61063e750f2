#!/usr/bin/env bash
# The GPU-only checks in one pass, under 8 minutes on one H200 (every part has its own time limit); the figures
# go to $OUT (default ./gpu_out), all of them into one JSON, $OUT/gpu_checks.json:
#   1. engine: the engine against the plain compiled loop (tools/bench.py engine): medium bf16, 16 and 128
#      sequences of 512 tokens, ZeRO 0/1/2 x compile off/on: tokens/s, ratio to the plain compiled loop, MFU
#   2. tests: pytest -m gpu: fp16 loss scaling on tiny that really overflows, the overflow skips counted; medium at
#      512 tokens under an 8 GiB cap with single_gpu_8gb.json and sampling on (peak reserved memory); FLOPs on
#      CUDA; the CUDA-graph and compiled decode steps against eager, int8 against bf16
#   3. generate: generation tokens/s, medium, bf16 and int8, batch 1/8/64, decode eager vs CUDA graph (and
#      torch.compile with GEN_INDUCTOR=1), plus a profile of one decode step eager and replayed
#   4. memory: the medium head's loss at 16 x 512, full logits vs chunked (peak memory, time, chunk sizes);
#      step time with padded (50,048) vs unpadded vocabulary rows
#
#   bash scripts/gpu_checks.sh                 # on the GPU machine
#   bash scripts/gpu_checks.sh --cpu-dry-run   # the same steps shrunk to CPU size (tiny model, 2 steps, the GPU
#                                              # tests skip): proves the script before a GPU is spent on it
# Knobs: PARTS ("engine tests generate memory"), ENGINE_ARGS, PY, WORK, *_TIMEOUT.
# On a machine without network: bash ../shared/device/wheelhouse.sh here first, carry .whl and .device.
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=""
[ "${1:-}" = "--cpu-dry-run" ] && DRY=1
OUTDIR=${OUT:-gpu_out}
mkdir -p "$OUTDIR"
if [ -z "$DRY" ] && [ -f .device/prelude.sh ] && [ -z "${NO_PRELUDE:-}" ]; then source .device/prelude.sh || exit 1; fi
export PYTHONUNBUFFERED=1 WANDB_MODE=offline PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
PY=${PY:-python3}
WORK=${WORK:-/tmp/andy_gpu}
PARTS=${PARTS:-engine tests generate memory}
rm -rf "$WORK" && mkdir -p "$WORK"
SECONDS=0
stamp() { echo "== [$SECONDS s] $*"; echo "$1 $SECONDS" >> "$WORK/timings"; }
if [ -n "$DRY" ]; then
    export DS_ACCELERATOR=cpu OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
    ENGINE_ARGS=${ENGINE_ARGS:---size tiny --batches 2 --seq-len 32 --steps 2 --warmup 1}
    GEN_COMMON="--device cpu --by-mode --size tiny --batch-sizes 1 --new-tokens 8 --skip-shed --skip-quality --skip-hf"
    GEN_COMMON="$GEN_COMMON --skip-cold --threads 1"
    GEN_DEVICE=cpu GEN_SIZE=tiny
    MEM_ARGS="--device cpu --dtype fp32 --size tiny --batch 2 --seq-len 32 --chunks 16 --reps 1 --step-sizes tiny"
    MEM_ARGS="$MEM_ARGS --step-batch 2 --step-seq-len 32 --threads 1"
else
    ENGINE_ARGS=${ENGINE_ARGS:---size medium --batches 16 128 --seq-len 512 --steps 12 --warmup 3}
    GEN_COMMON="--device cuda --size medium --batch-sizes ${GEN_BATCHES:-1,8,64} --new-tokens ${GEN_TOKENS:-128}"
    GEN_COMMON="$GEN_COMMON --skip-shed --skip-quality"
    GEN_DEVICE=cuda GEN_SIZE=medium
    MEM_ARGS="--device cuda --dtype bf16 --batch 16 --seq-len 512 --chunks 1024 4096 --reps 3 --step-sizes medium"
    MEM_ARGS="$MEM_ARGS --step-batch 16 --step-seq-len 512"
fi

if [[ " $PARTS " == *" engine "* ]]; then
    stamp engine "1. the engine against the plain compiled loop ($ENGINE_ARGS)"
    # shellcheck disable=SC2086
    timeout -k 10 ${ENGINE_TIMEOUT:-210} $PY tools/bench.py engine $ENGINE_ARGS --stages 0 1 2 --compile off on \
        --precision bf16 --out "$WORK/engine.json" 2>&1 | grep -E "^\{'batch'|Error|error" | tee "$OUTDIR/engine.log"
fi

if [[ " $PARTS " == *" tests "* ]]; then
    stamp tests "2. GPU tests: fp16 overflow skips, medium under 8 GiB with sampling, FLOPs, decode on CUDA"
    ANDY_GPU_FIGURES="$WORK/gpu_tests.json" timeout -k 10 ${PYTEST_TIMEOUT:-150} $PY -m pytest -q -m gpu \
        -p no:cacheprovider --junitxml="$WORK/pytest_gpu.xml" tests/e2e/test_gpu.py tests/unit/train/test_flops.py \
        tests/unit/infer/test_decode_compile.py 2>&1 | tee "$OUTDIR/pytest_gpu.log" | tail -n 15
fi

if [[ " $PARTS " == *" generate "* ]]; then
    stamp generate "3. generation speed: eager vs CUDA graph, bf16 and int8"
    # Eager and CUDA graph at every batch size (a capture costs milliseconds); torch.compile (Inductor: seconds
    # per shape) only when asked for, on fewer batch sizes.
    # shellcheck disable=SC2086
    timeout -k 10 ${GEN_TIMEOUT:-100} $PY tools/bench.py generate $GEN_COMMON \
        --compile-modes ${GEN_MODES:-off,cudagraph} --out "$WORK/generate.json" 2>&1 | tail -n 6
    if [ -n "${GEN_INDUCTOR:-}" ]; then
        # shellcheck disable=SC2086
        timeout -k 10 ${GEN_INDUCTOR_TIMEOUT:-150} $PY tools/bench.py generate $GEN_COMMON --batch-sizes 1,64 \
            --compile-modes inductor --out "$WORK/generate_inductor.json" 2>&1 | tail -n 6
    fi
    GEN_DEVICE=$GEN_DEVICE GEN_SIZE=$GEN_SIZE timeout -k 5 ${PROFILE_TIMEOUT:-45} $PY - <<'PYEOF' 2>&1 \
        | tee "$OUTDIR/decode_profile.txt" | tail -n 30
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
fi

if [[ " $PARTS " == *" memory "* ]]; then
    stamp memory "4. vocabulary head: full vs chunked loss, padded vs unpadded rows"
    # shellcheck disable=SC2086
    timeout -k 10 ${MEM_TIMEOUT:-60} $PY tools/bench.py memory $MEM_ARGS --out "$WORK/memory.json" 2>&1 | tail -n 4
fi

stamp merge "gpu_checks.json"
$PY - "$WORK" "$OUTDIR/gpu_checks.json" "${DRY:-0}" <<'PYEOF'
import json, sys
import xml.etree.ElementTree as ET
from pathlib import Path
work, out, dry = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1"
def load(name):
    path = work / name
    return json.loads(path.read_text()) if path.is_file() else None
figures = {"cpu_dry_run": dry, "engine": load("engine.json"), "gpu_tests": load("gpu_tests.json"),
           "generate": load("generate.json"), "generate_inductor": load("generate_inductor.json"),
           "memory": load("memory.json")}
xml = work / "pytest_gpu.xml"
if xml.is_file():
    cases = ET.parse(xml).getroot().iter("testcase")
    figures["pytest_gpu"] = {c.get("name"): ("failed" if c.find("failure") is not None or c.find("error") is not None
                                            else "skipped" if c.find("skipped") is not None else "passed")
                             for c in cases}
timings = [line.split() for line in (work / "timings").read_text().splitlines()]
figures["seconds"] = {a[0]: int(b[1]) - int(a[1]) for a, b in zip(timings, timings[1:])}
out.write_text(json.dumps(figures, indent=2) + "\n")
engine = figures["engine"] or {"results": []}
for row in engine["results"]:
    print(f"  batch {row['batch']:>4} {row['side']:<22} {row['tokens_s']:>12,.0f} tok/s  x{row['over_plain_compiled']:<6} "
          f"MFU {row['mfu']}")
print(f"  tests: {figures.get('pytest_gpu')}")
print(f"  parts present: {[k for k, v in figures.items() if v not in (None, False)]}; seconds: {figures['seconds']}")
PYEOF
stamp done "figures in $OUTDIR/gpu_checks.json"
