r"""The paper's 64->256 super-resolution stage: a ~600M-parameter Efficient U-Net conditioned on T5-XXL.

Variants (`--config configs/imagen_sr256.py:<variant>`), those of configs/imagen_base64.py, which this
config starts from: the text encoder and its 128 tokens, mesh and axis rules, XLA options, bf16 compute
with fp32 master weights, caption dropout, EMA, batch 2048, 10k warm-up steps, sampler and the bench
variant's text stand-in and step counts all come from there.

  paper  (default) Adam at 1e-4 with 10k warm-up steps, batch 2048, on a Hugging Face T5-XXL folder and
         an images + captions folder; each 256x256 training image also gives its 64x64 low-res input.
  bench  the same U-Net on a seeded one-layer 4096-wide stand-in for T5-XXL and the procedural shapes data
         at 256x256 (nothing downloaded), for the GPU training benchmark:

  python benchmarks/train_step.py --config configs/imagen_sr256.py:bench --config.train.batch_size=32

U-Net (IMAGEN_NOTES.md, "Efficient U-Net"): DBlock/UBlock ordering, 128 channels with multipliers 1,2,4,8
(128/256/512/1024 at 256/128/64/32), residual blocks 2,4,8,8 (more at low resolution, where they are
cheap), self- and text cross-attention only at 32x32. The 64x64 low-res image is upsampled and
concatenated to the input; its noise-augmentation level joins the noise-level conditioning.

Size: channels, blocks and attention are the paper's, so the conditioning widths set the rest. FiLM in each
residual block reads the conditioning vector, which makes cond_dim the big knob: cond_dim=512 (4x the
first level's width, the base stage's ADM convention), text_dim=256 (T5-XXL's 4096-wide tokens are
projected once, for the one cross-attention level and the pooled vector: 16x narrower, not the 32x of
text_dim=128), head_dim=64 as in the base stage (16 heads at 1024 channels). 602,169,347 parameters
(+0.4% of 600M; `python benchmarks/param_counts.py`).
"""

import ml_collections

from configs import imagen_base64
from imagen_jax.models.unet import UNet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    variant = arg or "paper"
    if variant not in ("paper", "bench"):
        raise ValueError(f"configs/imagen_sr256.py variant {variant!r}: use 'paper' or 'bench'.")
    c = imagen_base64.get_config(variant)

    c.data.resolution = 256
    c.data.lowres_resolution = 64  # the base stage's output
    c.data.crop_resolution = 0  # whole images: training sees what sampling produces
    # The low-res input should look like a good 64x64 image (smooth, unaliased), as the base stage makes.
    c.data.lowres_downsample = "bicubic"

    with c.model.ignore_type():  # num_res_blocks is one int in shapes.py, one per level here
        c.model.update(
            dict(
                channels=128,
                channel_mults=(1, 2, 4, 8),
                num_res_blocks=(2, 4, 8, 8),
                # Attention only at 32x32 (1024 positions): at 256x256 it would cost 4096x as much.
                self_attention=(False, False, False, True),
                cross_attention=(False, False, False, True),
                head_dim=64,
                cond_dim=512,
                text_dim=256,
                efficient=True,
                lowres_cond=True,
            )
        )
    if "lowres_upsample" in UNet.__dataclass_fields__:
        # Bicubic keeps the edges the 64x64 image has; bilinear blurs them and the U-Net must undo that.
        c.model.lowres_upsample = "bicubic"

    # Noise schedule: cosine, inherited (the paper's for the base and 64->256 stages).
    # Noise conditioning augmentation: at sampling the low-res input comes from the base stage, not from
    # shrinking a real image, so the U-Net must not trust it blindly. Levels up to 0.5 cover the base
    # stage's artefacts while the 64x64 content stays recognisable.
    c.diffusion.noise_aug_range = (0.0, 0.5)

    # The paper's SR optimizer: Adam (no weight decay) at 1e-4; warm-up, constant rate and batch 2048 as
    # in the base stage.
    c.optim.name = "adamw"
    c.optim.weight_decay = 0.0
    # Sampling. The low-res image already fixes layout and colour, yet the paper guides its SR stages with
    # weights up to ~8 for text detail; that works only with dynamic thresholding, which stops large
    # weights from saturating pixels. 5 is the middle of the useful range, as in the base stage. Aug level
    # 0.2: the paper's best-looking samples use 0.1-0.3 (0 gives the best FID); a little noise lets the
    # U-Net repaint the base stage's artefacts instead of sharpening them.
    c.sample.guidance = 5.0
    c.sample.threshold = "dynamic"
    c.sample.noise_aug_level = 0.2
    return c
