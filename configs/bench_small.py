r"""Benchmark config `bench_small`: `bench_tiny` at width 64 (widths 64/128/256).

python benchmarks/train_step.py --config configs/bench_small.py
python benchmarks/vs_imagen_pytorch.py --config configs/bench_small.py
"""

import ml_collections

from configs import bench_tiny


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    del arg
    return bench_tiny.get_config("64")
