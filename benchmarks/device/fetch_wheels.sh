#!/usr/bin/env bash
# Downloads, into .whl/ (git-ignored), the wheels imagen_jax needs beyond what the lent GPU machines' image
# already holds (jax with CUDA, flax, optax, orbax, transformers, ... for Python 3.12; see
# ../.library/device/KINDS.md). Run it here, where the package registries are reachable; then carry `.whl`
# in the device call, whose command starts with benchmarks/device/gpu_benchmarks.sh (it installs them).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qxF '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
# Ours (requirements.txt) and their own needs that the device image lacks; pinned to what CI tests here.
packages=(
  ml-collections==1.1.0 grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  dm-tree==0.1.10 immutabledict==4.3.1 promise==2.3 simple-parsing==0.1.9 docstring-parser==0.18.0
  termcolor==3.3.0 toml==0.10.2
)
platforms=()
for n in 2_28 2_27 2_24 2_17; do platforms+=(--platform "manylinux_${n}_x86_64"); done
platforms+=(--platform manylinux2014_x86_64 --platform any)
for p in "${packages[@]}"; do
  python3 -m pip download -q --no-deps --python-version 3.12 --implementation cp "${platforms[@]}" \
    --only-binary=:all: -d .whl "$p" 2>/dev/null \
    || python3 -m pip wheel -q --no-deps -w .whl "$p"  # sdist only (pure Python): build the wheel here
done
ls -la .whl
du -sh .whl
