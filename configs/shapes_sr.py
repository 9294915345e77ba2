r"""The shapes demo's super-resolution stage: 32x32 -> 128x128, the second stage of a CPU-sized cascade.

Train the base stage (configs/shapes.py) and this stage, then sample and score the cascade:

  python train.py --config configs/shapes.py --workdir runs/shapes
  python train.py --config configs/shapes_sr.py --workdir runs/shapes_sr    # ~25 min on 2 CPU cores
  python sample.py --workdir runs/shapes --sr_workdir runs/shapes_sr --noshare_text \
      --prompt "a large red circle" --num 4 --out cascade.png
  python -m imagen_jax.evaluation.shapes_sr --workdir runs/shapes_sr --base_workdir runs/shapes

Like the paper's 256->1024 stage it trains on random aligned crops (64x64 of the 128x128 image, with the
matching 16x16 of the low-res input) and has no self-attention, so it samples whole 128x128 images.
Variants (`--config configs/shapes_sr.py:tiny`): `tiny` is the test-size model (32 -> 64, crops of 32).
"""

import ml_collections

from configs import shapes


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "demo"
    if variant not in ("demo", "tiny"):
        raise ValueError(f"configs/shapes_sr.py variant {variant!r}: use 'demo' or 'tiny'.")
    # Same data seed and captions as the base stage of this size, so both stages see the same scenes; the
    # tiny variant keeps the tiny training settings (steps, batch, intervals) too.
    c = shapes.get_config(variant)
    # The seeded T5, not one pretrained per run: captions barely matter once the low-res image fixes the
    # layout, and a second pretrained encoder would differ from the base stage's anyway (so the cascade
    # encodes prompts per stage: sample.py --noshare_text).
    c.text.encoder = "random"
    # Bytes, as this stage's checkpoints were trained with: the low-res image carries the content, and a
    # vocabulary learned per run would differ from the base stage's too.
    c.text.update(dict(tokenizer="byte", max_length=84))
    c.text.t5.vocab_size = 384
    # Like the paper's last stage: crops for training, no self-attention (attention over a crop would not
    # match attention over the whole image), text cross-attention at the lowest resolution only.
    with c.model.ignore_type():  # per-level tuples where the base stage has one value
        c.model.update(
            dict(
                efficient=True,
                self_attention=False,
                text_positions=False,  # captions barely matter once the low-res image fixes the layout
                image_positions=False,  # crops: a pixel's place in the crop is not its place in the image
                lowres_cond=True,
            )
        )
    # Noise augmentation: the base stage's samples are slightly off in colour and edges; training on
    # noised inputs up to the middle of the schedule teaches the stage to repair rather than copy them.
    c.diffusion.noise_aug_range = (0.0, 0.5)
    c.sample.noise_aug_level = 0.0

    if variant == "tiny":
        c.data.update(dict(resolution=64, lowres_resolution=32, crop_resolution=32))
        c.text.train_jointly = False  # frozen, so a tiny cascade encodes its prompts once for both stages
        with c.model.ignore_type():
            c.model.update(dict(channels=16, channel_mults=(1, 2), num_res_blocks=(1, 1), patch_size=1))
            c.model.cross_attention = (False, True)
        return c

    c.data.update(dict(resolution=128, lowres_resolution=32, crop_resolution=64))
    # The SR stage learns mostly local sharpening: fewer scenes than the base stage suffice, and 128x128
    # renders cost 16x the disk of 32x32 ones.
    c.data.num_train = 20_000
    with c.model.ignore_type():
        c.model.update(
            dict(
                channels=32,
                channel_mults=(1, 2, 4),
                num_res_blocks=(1, 2, 2),  # Efficient U-Net: more blocks at low resolution, where cheap
                cross_attention=(False, False, True),
                patch_size=2,  # the U-Net runs at 32x32 on a 64x64 crop
            )
        )
    c.optim.learning_rate = 1e-3
    c.train.batch_size = 32
    # 1,200 steps (12 minutes) left the samples speckled, no sharper than bicubic upsampling; 2,600 steps
    # made them sharper than it (docs/cascade.md).
    c.train.num_steps = 2_600
    c.train.time_budget_minutes = 25.0
    c.train.checkpoint_every = 200
    # Grids show the first batch's low-res crops beside this stage's samples of them.
    c.train.sample_every = 400
    # Few ancestral steps on the quadratic grid (dense near t=0): each step's fresh noise comes back as
    # faint grain this short-trained stage does not fully remove, so fewer steps leave less, while the
    # dense end keeps edges as sharp as 50 steps do. The deterministic samplers leave the most grain
    # (docs/cascade.md, "Few-step sampling for the SR stage").
    c.sample.sampler = "ddpm"
    c.sample.num_steps = 5
    c.sample.time_grid = "quadratic"
    c.sample.guidance = 1.0  # the low-res image carries the layout; guidance mostly adds contrast here
    # No thresholding: without guidance x0 predictions stay in range, and dynamic thresholding rescales
    # the mostly-black predictions towards grey at every step, which brightened whole images
    # (docs/cascade.md).
    c.sample.threshold = "none"
    c.eval.num_captions = 128
    c.eval.batch_size = 32
    return c
