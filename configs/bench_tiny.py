r"""Benchmark config `bench_tiny`: the small U-Net used to compare speed with imagen-pytorch.

  python benchmarks/train_step.py --config configs/bench_tiny.py
  python benchmarks/vs_imagen_pytorch.py --config configs/bench_tiny.py

Width 32, multipliers 1,2,4, 2 residual blocks per level, self- and cross-attention at the lowest level only
(4 heads), 32x32 images, batch 32, 16 text tokens of width 128 (a frozen encoder: the benchmarks feed
random embeddings, as from the embedding cache). It is a complete stage config, so
`train.py --config configs/bench_tiny.py` trains it on the shapes data.
"""

import ml_collections

from configs import shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = shapes.get_config("demo")
    width = int(arg or 32)  # bench_small.py passes 64
    c.data.resolution = 32
    c.train.batch_size = 32
    c.text.encoder = "random"  # the benchmarks feed synthetic text: no encoder to pretrain
    c.text.tokenizer = "byte"  # nor a vocabulary to learn
    c.text.t5.vocab_size = 384
    c.text.max_length = 16
    c.text.train_jointly = False
    c.text.t5.d_model = 128
    c.model.update(
        dict(
            channels=width,
            channel_mults=(1, 2, 4),
            num_res_blocks=2,
            self_attention=(False, False, True),
            cross_attention=(False, False, True),
            num_heads=4,
            cond_dim=4 * width,  # imagen-pytorch's time-conditioning width (4 x dim)
            text_dim=128,
            norm_groups=8,  # imagen-pytorch's ResnetBlock GroupNorm groups
            patch_size=1,
            image_positions=False,  # imagen-pytorch's U-Net has none
        )
    )
    return c
