#!/usr/bin/env bash
# The GPU benchmarks of issue 5 as one command for a lent device machine (at most 9m45s of phase limits):
#   bash benchmarks/device/gpu_benchmarks.sh            (the device call carries `.whl`: fetch_wheels.sh)
# Writes each result's JSON and one log to $OUT (or benchmarks/results/gpu/ when OUT is unset; the device
# tool brings back at most 8 files). Each phase has
# its own time limit, so one that runs out of memory or time does not cost the others. Batch sizes:
# BASE_BATCH (the ~2B base U-Net without remat; default 8, 16 on cards over 100 GB) and REMAT_BATCH (with
# remat; default 32, or 64); the base phases halve a batch whose memory plan does not fit (--fit_batch).
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
# Quick phases first; the base U-Net's compiles (with cuDNN conv autotuning) get the most time.
run train_bench_small_bf16 60 benchmarks/train_step.py --config configs/bench_small.py \
  --config.model.dtype=bfloat16
run sampling_bench_small_bf16 45 benchmarks/sampling.py --config configs/bench_small.py \
  --config.model.dtype=bfloat16 --samplers dpmpp2m --steps 25 --guidance 3
run train_base64_bf16 210 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
  --config.train.batch_size="$base_batch"
# The cuDNN phase reuses the batch the first base phase settled on (no second --fit_batch search).
fitted=$(python3 -c "import json; print(json.load(open('$out/train_base64_bf16.json'))['batch_size'])" \
  2>/dev/null) && base_batch="$fitted"
run train_base64_bf16_remat 180 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
  --config.model.remat=True --config.train.batch_size="$remat_batch"
run train_base64_bf16_cudnn 90 benchmarks/train_step.py --config "$base" --iters 10 --fit_batch \
  --config.train.batch_size="$base_batch" --config.model.attention_impl=cudnn
