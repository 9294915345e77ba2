#!/usr/bin/env bash
# The GPU benchmarks for a lent device machine, one call (the call carries `.whl`: fetch_wheels.sh):
#   bash benchmarks/device/gpu_benchmarks.sh
# runs, by default, two phases within BUDGET_S seconds (default 540):
#   attention     cuDNN's fused self-attention against XLA's: one train step's loss and gradients with
#                 each, against float32 (benchmarks/attention_kernels.py; the base U-Net's attention shapes,
#                 one block per level, batch 8): may `model.attention_impl="cudnn"` become a GPU default?
#   cudnn:cublas@128  the base U-Net's train step with cuDNN attention and cuBLAS GEMMs at batch 128, which
#                 its device peak at batch 64 (70 GB of 143 on the H200, 2026-12-04) says fits without remat
# against the H200's runs of 2026-12-04 (docs/benchmarks.md): cudnn:cublas at 64 (116.5 images/s, MFU
# 48.2%), base:cublas at 64 and 16, base (Triton GEMMs) at 16.
# PHASES picks and orders others: base, big (the largest batch, at most 4x, that an earlier base phase's
# device peak says fits), remat (at REMAT_BATCH, default 128 or 64), cudnn, scan (model.scan_blocks), whole
# (the step as one program), attention, small and sampling (bench_small); any phase suffixed ':cublas'
# runs with --xla_gpu_enable_triton_gemm=false, and a base U-Net phase suffixed '@B' at batch B.
# Writes each result's JSON and one log to $OUT (or benchmarks/results/gpu/ when OUT is unset; the device
# tool brings back at most 8 files). Each phase runs under its own time limit, cut to what is left of the
# budget, so one that runs out of memory or time does not cost the others; phases print progress lines, so
# one stopped at its limit says how far it got. Base U-Net phases halve a batch whose memory plan does not
# fit (--fit_batch). BASE_CONFIG swaps the model (a tiny config dry-runs this script on any host).
# PROFILE=1 traces 3 more steps of the first train phase (jax.profiler) and brings back its Perfetto
# trace as $OUT/<phase>_trace.json.gz (open it at ui.perfetto.dev).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
deadline=$((SECONDS + ${BUDGET_S:-540}))
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl || exit 1
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
log="$out/phases.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$log"
python3 -c "import jax, flax, optax, orbax.checkpoint, ml_collections, grain, tensorflow_datasets;
print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$log" || exit 1

run() {  # name, time limit (s), extra XLA flags, script and flags
  local name="$1" cap="$2" xla="$3"
  shift 3
  local left=$((deadline - SECONDS - 15))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 60 ]; then
    echo "== $name: skipped, ${left} s of BUDGET_S left" | tee -a "$log"
    return
  fi
  local profile=()
  if [ "${PROFILE:-0}" = 1 ] && [ "$1" = benchmarks/train_step.py ]; then
    profile=(--profile_dir "/tmp/profile_$name")
    PROFILE=done  # the first train phase only
  fi
  echo "== $name: started $(date -u +%T), limit ${limit} s, XLA_FLAGS='${XLA_FLAGS:-}${xla}'" | tee -a "$log"
  XLA_FLAGS="${XLA_FLAGS:-}${xla}" timeout "$limit" python3 "$@" --json "$out/$name.json" "${profile[@]}" \
    > "/tmp/$name.log" 2>&1
  local status=$?
  if [ ${#profile[@]} -gt 0 ]; then  # the trace lies 3 folders down, deeper than the device tool returns
    local trace
    trace=$(find "/tmp/profile_$name" -name perfetto_trace.json.gz | head -1)
    [ -n "$trace" ] && cp "$trace" "$out/${name}_trace.json.gz"
  fi
  local ours  # the phase's output without XLA's C++ log lines (our Python modules' log lines stay)
  ours=$(grep -v -E '^[IW][0-9]{4} [^]]*\.(cc|h):[0-9]+\]' "/tmp/$name.log")
  { echo "== $name: exit $status"; tail -40 <<< "$ours"; } >> "$log"
  echo "== $name: exit $status"
  tail -4 <<< "$ours"
}

# The largest batch (a multiple of 8, at most 4x) that the device's peak memory in JSON $1 says fits; 0 if
# none larger. Each image's share is the peak less the fp32 weights and EMA (8 bytes per parameter), so
# the rest of the fixed part counts as per-image too and the estimate errs small: from the H200's batch-16
# run (2026-12-04) it gives 56, where 64 ran and about 79 would fit. XLA's plan would not do: the device's
# peak ran 10 GB over it.
largest_batch() {
  python3 - "$1" << 'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
b, peak, limit = r["batch_size"], r.get("peak_bytes"), r.get("device_memory_limit_bytes")
if r.get("kind") != "device" or not peak or not limit:
    print(0)
    sys.exit()
fixed = 8 * r["unet_params"]
fit = int((0.95 * limit - fixed) // max((peak - fixed) / b, 1)) // 8 * 8
print(min(fit, 4 * b) if fit > b else 0)
EOF
}

base="${BASE_CONFIG:-configs/imagen_base64.py:bench}"
# Default batches by the card's memory (an H200 has 141 GB, an H100 80 GB); override with the variables.
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${mem_mib:-0}" -gt 100000 ]; then big=1; else big=0; fi
base_batch="${BASE_BATCH:-$((big ? 64 : 16))}"
remat_batch="${REMAT_BATCH:-$((big ? 128 : 64))}"
last_json=""
# cuDNN's fused attention; identical blocks as loops; the gradients and the update as one program.
declare -A switch=(
  [cudnn]=--config.model.attention_impl=cudnn
  [scan]=--config.model.scan_blocks=True
  [whole]=--config.train.separate_update=False
)
# The lent H200s showed that GPU compiles, not steps, take the time: bench_small's train step took 69 s to
# compile (2026-11-27), half of it autotuning, and without autotuning the step ran 74x slower; the base
# U-Net's took 111 s at batch 16 and 211 s at batch 64 (2026-12-04) with cuBLAS GEMMs, and 124 s at 16 with
# Triton's, whose step also ran 3% slower. Triton GEMMs are autotuned over many generated kernels each,
# cuBLAS picks among its own.
for phase in ${PHASES:-attention cudnn:cublas@128}; do
  batch=""
  case "$phase" in *@*) batch="${phase##*@}" phase="${phase%@*}" ;; esac
  name="${phase%%:*}" xla="" suffix=""
  if [ "$phase" != "$name" ]; then
    [ "${phase#*:}" = cublas ] || { echo "unknown variant in $phase (only :cublas)"; exit 2; }
    xla=" --xla_gpu_enable_triton_gemm=false" suffix="_cublas"
  fi
  b="${batch:-$base_batch}" tag="${batch:+_b$batch}$suffix"
  train=(benchmarks/train_step.py --config "$base" --iters 10 --fit_batch)
  case "$name" in
    base)
      run "train_base64_bf16$tag" 540 "$xla" "${train[@]}" --config.train.batch_size="$b"
      last_json="$out/train_base64_bf16$tag.json"
      # Later phases start from the batch this one settled on, unless it was given one of its own.
      fitted=$(python3 -c "import json; print(json.load(open('$last_json'))['batch_size'])" 2>/dev/null) \
        && [ -z "$batch" ] && base_batch="$fitted" ;;
    big)
      fit=0
      [ -f "$last_json" ] && fit=$(largest_batch "$last_json")
      if [ "$fit" -gt 0 ]; then
        run "train_base64_bf16_b${fit}$suffix" 540 "$xla" "${train[@]}" --config.train.batch_size="$fit"
      else
        echo "== big: skipped, no earlier base phase's device peak says a larger batch fits" | tee -a "$log"
      fi ;;
    remat)
      run "train_base64_bf16_remat$tag" 540 "$xla" "${train[@]}" --config.model.remat=True \
        --config.train.batch_size="${batch:-$remat_batch}" ;;
    cudnn | scan | whole)  # the base phase with one switch flipped, each timed against `base`
      run "train_base64_bf16_$name$tag" 540 "$xla" "${train[@]}" --config.train.batch_size="$b" \
        "${switch[$name]}" ;;
    small)
      run "train_bench_small_bf16$suffix" 150 "$xla" benchmarks/train_step.py --config configs/bench_small.py \
        --config.model.dtype=bfloat16 ;;
    sampling)
      run "sampling_bench_small_bf16$suffix" 60 "$xla" benchmarks/sampling.py --config configs/bench_small.py \
        --config.model.dtype=bfloat16 --samplers dpmpp2m --steps 25 --guidance 3 ;;
    attention)  # cuDNN's fused attention against XLA's: the base U-Net's attention shapes, one block a level
      run "attention_kernels$suffix" 300 "$xla" benchmarks/attention_kernels.py --config "$base" \
        --config.model.num_res_blocks=1 --config.train.batch_size="${batch:-8}" ;;
    *) echo "unknown phase $phase (base big small sampling remat cudnn scan whole attention)"; exit 2 ;;
  esac
done
# One table of every train result, last in the output (the device tool returns the output's end).
python3 - "$out" << 'EOF' | tee -a "$log"
import glob, json, os, sys
keys = ("batch_size", "compile_seconds", "lower_seconds", "xla_compile_seconds", "images_per_second", "mfu",
        "hfu", "planned_bytes", "device_memory_limit_bytes", "peak_bytes")
print("phase", *keys)
for path in sorted(glob.glob(os.path.join(sys.argv[1], "train_*.json")), key=os.path.getmtime):
    r = json.load(open(path))
    print(os.path.basename(path)[:-5], *(f"{r[k]:.4g}" if isinstance(r.get(k), float) else r.get(k) for k in keys))
EOF
