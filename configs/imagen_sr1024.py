r"""The paper's 256->1024 super-resolution stage: a ~400M-parameter Efficient U-Net without self-attention.

Variants (`--config configs/imagen_sr1024.py:<variant>`), those of configs/imagen_sr256.py, which this
config starts from (and which starts from configs/imagen_base64.py): text encoder, mesh, XLA options, bf16,
Adam at 1e-4 with warm-up, batch 2048, conditioning widths and the low-res conditioning all come from there.

  paper  (default) trains on 256x256 crops of 1024x1024 images, each with the matching 64x64 crop of the
         256x256 low-res image; the U-Net is convolutional apart from text cross-attention, so it samples
         at the full 1024x1024 from a whole 256x256 input.
  bench  the seeded 4096-wide T5-XXL stand-in and procedural shapes (nothing downloaded):

  python benchmarks/train_step.py --config configs/imagen_sr1024.py:bench --config.train.batch_size=32

U-Net (IMAGEN_NOTES.md, "Efficient U-Net"): 128 channels with multipliers 1,2,4,8 (128/256/512/1024 at
1024/512/256/128 when sampling), residual blocks 2,4,8,5, no self-attention anywhere (what it learns on
256x256 crops would not carry over to whole 1024x1024 images, and its cost, quadratic in positions, would
grow 256x from the crops' 32x32 lowest level to 128x128), text cross-attention only at the lowest level.
Blocks: the 64->256 stage's 2,4,8,8 with the lowest level cut to 5. The 1024-channel level holds most
parameters (each block there ~20M), so the cut to ~400M goes there; it also matters least here, since the
256x256 input already fixes the global layout that low resolution models. The high-resolution levels, which
draw the fine texture this stage adds, keep their blocks; they hold little of the count but most of the
activation memory. cond_dim 512, text_dim 256, head_dim 64 as in the 64->256 stage. 395,480,067 parameters
(-1.1% of 400M; `python benchmarks/param_counts.py`).
"""

import ml_collections

from configs import imagen_sr256


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "paper"
    if variant not in ("paper", "bench"):
        raise ValueError(f"configs/imagen_sr1024.py variant {variant!r}: use 'paper' or 'bench'.")
    c = imagen_sr256.get_config(variant)

    c.data.resolution = 1024
    c.data.lowres_resolution = 256  # the 64->256 stage's output
    # 256x256 crops (with their 64x64 low-res crops): 16x less activation memory per example than whole
    # 1024x1024 images, and a convolutional U-Net without self-attention sees no difference in scale.
    c.data.crop_resolution = 256

    c.model.num_res_blocks = (2, 4, 8, 5)
    c.model.self_attention = (False, False, False, False)
    c.model.cross_attention = (False, False, False, True)

    # The paper's schedule for this stage. Noise augmentation levels are times on it, and it noises faster
    # than the cosine one: level 0.3 here has about the log-SNR of 0.5 on cosine (~0), and 0.1 that of 0.2,
    # so these keep the 64->256 stage's noise range and sampling level.
    c.diffusion.schedule = "linear"
    c.diffusion.noise_aug_range = (0.0, 0.3)
    c.sample.noise_aug_level = 0.1

    # Text reaches this stage only through one cross-attention level at 1/8 resolution and the pooled
    # vector, and the 256x256 input fixes the content; a large weight would mostly exaggerate texture
    # contrast. Dynamic thresholding stays (inherited) for the same reason as in the 64->256 stage.
    c.sample.guidance = 3.0
    return c
