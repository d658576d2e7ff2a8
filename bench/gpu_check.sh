#!/usr/bin/env bash
# The GPU measurement in one prepared script (see docs/performance.md).
#
#   bash bench/gpu_check.sh wheels [DIR]   # HERE (network): fetch/build the wheels into DIR (.whl)
#   bash bench/gpu_check.sh                # THERE (device machine, no network): install them
#                                          # into /tmp/site, probe the card, run mptk-bench for
#                                          # the GPT-1.3B recipe in bf16, JSON lines into $OUT
#
# Device call (the tool `run`): carry [".whl"], timeout_s 560, command:
#   bash bench/gpu_check.sh
# Environment knobs: WHEELS (.whl), OUT (bench-out), BENCH_VARIANTS, BENCH_STEPS (15),
# BENCH_WARMUP (3), BENCH_TIMEOUT (seconds per variant, 240), BENCH_BUDGET (seconds for the
# whole bench, 420), BENCH_ARGS (more mptk-bench arguments / Hydra overrides), BENCH_SHAPE
# (1p3b), SKIP_INSTALL=1 (a dry run where mptk's packages are installed: here, on the CPU),
# OBS_CHECK=0 (skip the observability checks: memory snapshot + nsys capture range, ~1-2 min),
# BENCH=0 (only those checks, no mptk-bench).
set -uo pipefail
cd "$(dirname "$0")/.."

# The image has torch 2.11 (cu130), triton, numpy, packaging, einops, msgpack, ninja, psutil,
# py-cpuinfo, tqdm, pyyaml, rich, tokenizers (KINDS.md); these are what mptk needs on top.
# wandb is not needed: mptk-bench runs with log=disabled and mptk imports wandb lazily.
BINARY=(megatron-core==0.16.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
        typing-inspection==0.4.5 typing-extensions==4.16.0 hjson==3.1.0 hydra-core==1.3.8
        omegaconf==2.3.1)
SOURCE_ONLY=(deepspeed==0.19.8 antlr4-python3-runtime==4.9.3)  # sdists: built as pure wheels

fetch_wheels() {
    local dir=${1:-.whl}
    mkdir -p "$dir"
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        --platform manylinux1_x86_64 -d "$dir" "${BINARY[@]}" || return 1
    python3 -m pip wheel -q --no-deps -w "$dir" "${SOURCE_ONLY[@]}" || return 1
    ls -la "$dir"
    du -sh "$dir"
}

if [[ "${1:-}" == "wheels" ]]; then
    fetch_wheels "${2:-.whl}"
    exit $?
fi

OUT=${OUT:-bench-out}
WHEELS=${WHEELS:-.whl}
mkdir -p "$OUT"
exec > >(tee "$OUT/check.log") 2>&1
began=$(date +%s)
say() { echo "gpu_check [$(( $(date +%s) - began ))s]: $*"; }

if [[ -z "${SKIP_INSTALL:-}" ]]; then  # SKIP_INSTALL=1: a dry run in an installed venv
    say "install from $WHEELS"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl || { say "install failed"; exit 3; }
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
        --format=csv 2>&1 | tee "$OUT/gpu.csv"
fi

say "imports and the card's bf16 matmul rate"
python3 - <<'EOF' 2>&1 | tee "$OUT/probe.txt" || { say "probe failed"; exit 4; }
import time, torch, deepspeed, megatron.core, hydra, omegaconf, tokenizers
import mptk.cli.bench, mptk.launch.bench, mptk.models.baseline, recipes.gpt.recipe
print("torch", torch.__version__, "deepspeed", deepspeed.__version__, "megatron-core",
      megatron.core.__version__, "cuda", torch.version.cuda)
if not torch.cuda.is_available():
    raise SystemExit(print("no GPU: matmul probe skipped"))
print(torch.cuda.get_device_name())
a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
for _ in range(3):
    a @ b
torch.cuda.synchronize()
t = time.perf_counter()
for _ in range(20):
    a @ b
torch.cuda.synchronize()
print(f"matmul_bf16_tflops {20 * 2 * 8192**3 / (time.perf_counter() - t) / 1e12:.0f}")
EOF

# Observability on the card: debug.memory_snapshot's pickle read back by PyTorch's memory
# visualiser, and the sbatch templates' nsys wrapper (the same block, from mptk.launch.slurm)
# capturing exactly the profile window through cudaProfilerStart/Stop. A tiny GPT, one rank.
OBS_ARGS=(launcher=local1 parallel=single log=disabled train.steps=6 train.eval_interval=0 train.save_interval=-1
          data.max_chars=300000 data.cache_dir=/tmp/mptk-obs-cache)

memory_snapshot_check() {
    local run=$OUT/obs_memory
    say "debug.memory_snapshot: tiny GPT, 6 steps, snapshot window of 3 steps -> $run/memory"
    timeout 240 python3 -m mptk.cli.train "${OBS_ARGS[@]}" debug.memory_snapshot=true \
        debug.memory_snapshot_steps=3 "hydra.run.dir=$run" > "$OUT/obs_memory.log" 2>&1
    say "train exit $? (log: $OUT/obs_memory.log)"
    grep -h "memory snapshot of rank\|peak memory over\|CUDA-only" "$OUT/obs_memory.log" "$run"/logs/*.log \
        2> /dev/null | sort -u | tail -n 4
    python3 - "$run/memory/rank0_step3.pickle" "$OUT/obs_memory_trace.html" <<'PY' || say "memory snapshot check FAILED"
import pickle, sys
from torch.cuda import _memory_viz
snap = pickle.load(open(sys.argv[1], "rb"))
events = sum(len(t) for t in snap["device_traces"])
print(f"memory_snapshot segments {len(snap['segments'])} trace_events {events}")
assert snap["segments"] and events > 0, "empty snapshot"
open(sys.argv[2], "w").write(_memory_viz.trace_plot(snap))  # what pytorch.org/memory_viz draws
print(f"memory_viz trace_plot written: {sys.argv[2]}")
PY
}

nsys_check() {
    local RUN_DIR=$OUT/obs_nsys NSYS=()
    if ! command -v nsys > /dev/null; then
        say "nsys not on PATH: nsys wrapper check skipped"
        return 0
    fi
    say "nsys wrapper (slurm template block), profile window steps 2..4 -> $RUN_DIR/nsys"
    export MPTK_NSYS=1 SLURM_PROCID=0
    eval "$(python3 -c 'from mptk.config.schema import ClusterConfig
from mptk.launch.slurm import nsys_block
print(nsys_block(ClusterConfig(nsys=True)))')"
    timeout 300 "${NSYS[@]}" python3 -m mptk.cli.train "${OBS_ARGS[@]}" profile.start_step=2 \
        profile.end_step=4 "hydra.run.dir=$RUN_DIR" > "$OUT/obs_nsys.log" 2>&1
    say "nsys + train exit $? (log: $OUT/obs_nsys.log)"
    unset MPTK_NSYS SLURM_PROCID
    ls -la "$RUN_DIR/nsys" 2> /dev/null
    local rep=$RUN_DIR/nsys/rank_0.nsys-rep
    [[ -s "$rep" ]] || { say "nsys check FAILED: no $rep"; return 1; }
    # The captured range holds the window's kernels and mptk's NVTX phase ranges, nothing else.
    nsys stats --report nvtx_sum --format csv --output - "$rep" 2> /dev/null | head -n 12
    nsys stats --report cuda_gpu_kern_sum --format csv --output - "$rep" 2> /dev/null | head -n 6
}

if [[ "${OBS_CHECK:-1}" != 0 ]]; then
    if python3 -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
        memory_snapshot_check
        nsys_check
    else
        say "no GPU: memory snapshot and nsys checks skipped"
    fi
fi
if [[ "${BENCH:-1}" == 0 ]]; then
    say "done (BENCH=0)"
    exit 0
fi

VARIANTS=${BENCH_VARIANTS:-torch_compile,torch_eager,zero1_compile,zero1,zero0_compile,zero1_fused}
SHAPE=${BENCH_SHAPE:-1p3b}
say "mptk-bench --shape $SHAPE variants $VARIANTS"
timeout --signal=INT "${BENCH_BUDGET:-420}" python3 -m mptk.cli.bench --shape "$SHAPE" \
    --variants "$VARIANTS" --steps "${BENCH_STEPS:-15}" --warmup "${BENCH_WARMUP:-3}" \
    --timeout "${BENCH_TIMEOUT:-240}" --out "$OUT/bench.jsonl" ${BENCH_ARGS:-} \
    > /dev/null 2> "$OUT/bench.log"
code=$?
if [[ $code == 124 ]]; then  # not 124 to the caller: that reads as the device call's own timeout
    say "BENCH_BUDGET (${BENCH_BUDGET:-420} s) reached: variants after the last line did not run"
    code=5
fi
say "mptk-bench exit $code (log: $OUT/bench.log, lines: $OUT/bench.jsonl)"
tail -n 40 "$OUT/bench.log" | grep -v '^\s*warnings.warn' | tail -n 25
say "table"
python3 - "$OUT/bench.jsonl" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print(f"{'variant':<15}{'tok/s':>10}{'TFLOP/s':>9}{'MFU':>7}{'x base':>8}{'GiB':>7}{'s/step':>8}  phases (s)")
for r in rows:
    if "error" in r:
        print(f"{r['variant']:<15} ERROR {r['error'][:200]}")
        continue
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    ph = " ".join(f"{k}={v:.3f}" for k, v in r["phases_s"].items())
    print(f"{r['variant']:<15}{r['tokens_per_s']:>10.0f}{r['tflops_per_device']:>9.1f}{mfu:>7}"
          f"{r.get('vs_baseline', float('nan')):>8.2f}{r['peak_mem_gib']:>7.1f}"
          f"{r['step_time_s']:>8.3f}  {ph}  [{r.get('gpu')}]")
EOF
say "done"
exit $code
