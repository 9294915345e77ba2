#!/usr/bin/env bash
# The GPU benchmarks of issue 5 for a lent device machine, one call each (default phase: at most 9 min):
#   bash benchmarks/device/gpu_benchmarks.sh     (the base U-Net; the call carries `.whl`: fetch_wheels.sh)
#   PHASES="small sampling" bash benchmarks/device/gpu_benchmarks.sh       (bench_small, 3.5 min at most)
#   PHASES=remat ... ; PHASES=cudnn ... ; PHASES=scan ... ; PHASES=whole ...   (the base U-Net with remat /
#   cuDNN / scan / the step as one program)
# Writes each result's JSON and one log to $OUT (or benchmarks/results/gpu/ when OUT is unset; the device
# tool brings back at most 8 files). Each phase has its own time limit, so one that runs out of memory or
# time does not cost the others, and prints progress lines, so one stopped at its limit says how far it
# got. Batch sizes: BASE_BATCH (the ~2B base U-Net without remat; default 8, 16 on cards over 100 GB) and
# REMAT_BATCH (with remat; default 32, or 64); each base U-Net phase halves a batch whose memory plan does
# not fit (--fit_batch).
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${OUT:-benchmarks/results/gpu}"
mkdir -p "$out"
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

run() {  # name, time limit (s), script and flags
  local name="$1" limit="$2"
  shift 2
  timeout "$limit" python3 "$@" --json "$out/$name.json" > "/tmp/$name.log" 2>&1
  local status=$?
  { echo "== $name: exit $status"; grep -v -E "^(I|W)[0-9]{4} " "/tmp/$name.log" | tail -40; } >> "$log"
  echo "== $name: exit $status"
  grep -v -E "^(I|W)[0-9]{4} " "/tmp/$name.log" | tail -3
}
base="configs/imagen_base64.py:bench"
# Default batches by the card's memory (an H200 has 141 GB, an H100 80 GB); override with the variables.
mem_mib=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | head -1)
if [ "${mem_mib:-0}" -gt 100000 ]; then big=1; else big=0; fi
base_batch="${BASE_BATCH:-$((big ? 16 : 8))}"
remat_batch="${REMAT_BATCH:-$((big ? 64 : 32))}"
# PHASES picks and orders the phases (default: base). The first lent H200 (2026-11-27) showed that GPU
# compiles, not steps, take the time: bench_small's train step took 69 s to compile (with XLA's
# autotuning; 34 s with --xla_gpu_autotune_level=0, but then the step ran 74x slower), and the base
# U-Net's step compiles ~7x longer than bench_small's on CPU, so it gets a device call of its own.
for phase in ${PHASES:-base}; do
  case "$phase" in
    base)
      run train_base64_bf16 540 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
        --config.train.batch_size="$base_batch"
      # A later phase in the same call starts from the batch this one settled on.
      fitted=$(python3 -c "import json; print(json.load(open('$out/train_base64_bf16.json'))['batch_size'])" \
        2>/dev/null) && base_batch="$fitted" ;;
    small)
      run train_bench_small_bf16 150 benchmarks/train_step.py --config configs/bench_small.py \
        --config.model.dtype=bfloat16 ;;
    sampling)
      run sampling_bench_small_bf16 60 benchmarks/sampling.py --config configs/bench_small.py \
        --config.model.dtype=bfloat16 --samplers dpmpp2m --steps 25 --guidance 3 ;;
    remat)
      run train_base64_bf16_remat 540 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
        --config.model.remat=True --config.train.batch_size="$remat_batch" ;;
    cudnn)
      run train_base64_bf16_cudnn 540 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
        --config.train.batch_size="$base_batch" --config.model.attention_impl=cudnn ;;
    scan)  # identical blocks as loops (model.scan_blocks): compile time and step time against `base`
      run train_base64_bf16_scan 540 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
        --config.train.batch_size="$base_batch" --config.model.scan_blocks=True ;;
    whole)  # the step as one program (train.separate_update=False): compile and step time against `base`
      run train_base64_bf16_whole 540 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
        --config.train.batch_size="$base_batch" --config.train.separate_update=False ;;
    *) echo "unknown phase $phase (base small sampling remat cudnn scan whole)"; exit 2 ;;
  esac
done
