"""The paper's super-resolution stage configs: sizes (from shapes alone), architecture, inherited settings."""

import pathlib
import sys

import pytest

from configs import imagen_base64, imagen_sr256, imagen_sr1024
from imagen_jax.training.config_checks import validate_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import param_counts  # noqa: E402

VARIANTS = ("paper", "bench")
# config module -> (exact U-Net parameters, the paper's size)
SIZES = {
    imagen_sr256: (602_169_347, 600_000_000),
    imagen_sr1024: (395_480_067, 400_000_000),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("module", [imagen_sr256, imagen_sr1024], ids=["sr256", "sr1024"])
def test_sr_unet_is_the_papers_size(module, variant):
    count = param_counts.unet_param_count(module.get_config(variant))
    exact, paper = SIZES[module]
    assert count == exact
    assert abs(count / paper - 1) < 0.10


@pytest.mark.parametrize("variant", VARIANTS)
def test_sr256_architecture(variant):
    c = imagen_sr256.get_config(variant)
    m = c.model
    assert m.efficient and m.lowres_cond
    assert (m.channels, tuple(m.channel_mults), tuple(m.num_res_blocks)) == (128, (1, 2, 4, 8), (2, 4, 8, 8))
    assert [m.channels * k for k in m.channel_mults] == [128, 256, 512, 1024]
    # Self- and text cross-attention at the lowest resolution only.
    assert tuple(m.self_attention) == tuple(m.cross_attention) == (False, False, False, True)
    assert (c.data.resolution, c.data.lowres_resolution, c.data.crop_resolution) == (256, 64, 0)
    assert c.diffusion.schedule == "cosine"
    o = c.optim
    assert (o.name, o.learning_rate, o.weight_decay) == ("adamw", 1e-4, 0.0) and o.warmup_steps > 0
    validate_config(c)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sr1024_architecture(variant):
    c = imagen_sr1024.get_config(variant)
    m = c.model
    assert m.efficient and m.lowres_cond
    assert [m.channels * k for k in m.channel_mults] == [128, 256, 512, 1024]
    assert not any(m.self_attention)  # none anywhere: trained on crops, sampled at full size
    assert tuple(m.cross_attention) == (False, False, False, True)
    # 1024 images from 256 inputs, trained on 256x256 crops (each with its 64x64 low-res crop).
    assert (c.data.resolution, c.data.lowres_resolution, c.data.crop_resolution) == (1024, 256, 256)
    assert c.diffusion.schedule == "linear"
    o = c.optim
    assert (o.name, o.learning_rate, o.weight_decay) == ("adamw", 1e-4, 0.0)
    validate_config(c)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("module", [imagen_sr256, imagen_sr1024], ids=["sr256", "sr1024"])
def test_sr_configs_inherit_the_base_stage_settings(module, variant):
    base, c = imagen_base64.get_config(variant), module.get_config(variant)
    assert c.text.to_dict() == base.text.to_dict()  # T5-XXL (or its bench stand-in), 128 tokens, frozen
    for key in (
        "mesh", "mesh_dcn", "sharding", "xla_options", "compilation_cache_dir",
        "compilation_cache_min_compile_seconds", "seed",
    ):
        assert c[key] == base[key], key
    assert c.data.name == base.data.name and c.data.folder == base.data.folder
    for key in ("dtype", "param_dtype", "text_positions", "norm_groups", "null_text", "remat"):
        assert c.model[key] == base.model[key], key
    for key in ("objective", "caption_dropout", "logsnr_min", "logsnr_max"):
        assert c.diffusion[key] == base.diffusion[key], key
    for key in ("learning_rate", "warmup_steps", "decay", "grad_clip", "ema_decay"):
        assert c.optim[key] == base.optim[key], key
    assert c.train.batch_size == base.train.batch_size == (2048 if variant == "paper" else 32)
    assert c.train.num_steps == base.train.num_steps
    if variant == "bench":
        assert c.text.encoder == "random" and c.text.t5.d_model == param_counts.T5_XXL_WIDTH
        assert c.data.name == "shapes"


@pytest.mark.parametrize("module", [imagen_sr256, imagen_sr1024], ids=["sr256", "sr1024"])
def test_sr_sampling_and_noise_augmentation_settings(module):
    c = module.get_config()
    lo, hi = c.diffusion.noise_aug_range
    assert 0.0 <= lo < hi <= 1.0 and 0.0 <= c.sample.noise_aug_level <= hi
    # Guided SR samples need dynamic thresholding; the paper's SR weights go up to ~8.
    assert c.sample.threshold == "dynamic" and 1.0 < c.sample.guidance <= 8.0
    assert c.data.lowres_downsample == "bicubic"


def test_param_counts_command_prints_every_paper_config(capsys):
    param_counts.main()
    out = capsys.readouterr().out
    for name, count in (
        ("imagen_base64", "2,121,910,275"),
        ("imagen_sr256", "602,169,347"),
        ("imagen_sr1024", "395,480,067"),
    ):
        assert name in out and count in out
