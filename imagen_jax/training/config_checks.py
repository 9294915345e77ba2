"""Up-front checks of a config's values, so mistakes fail before any compilation with one clear message."""

from __future__ import annotations

import jax
import ml_collections

from imagen_jax.diffusion import objectives, samplers, schedules
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.models.unet import COMPUTE_DTYPES, compute_dtype
from imagen_jax.parallel import xla_options


def _choice(value: object, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ValueError(f"config.{key}={value!r} is not one of {list(allowed)}.")


def _positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def validate_config(config: ml_collections.ConfigDict) -> None:
    d, t, o, s = config.diffusion, config.train, config.optim, config.sample
    _choice(d.schedule, schedules.SCHEDULE_NAMES, "diffusion.schedule")
    _choice(d.objective, objectives.OBJECTIVES, "diffusion.objective")
    _choice(d.loss_weighting, objectives.WEIGHTINGS, "diffusion.loss_weighting")
    if not 0.0 <= d.caption_dropout < 1.0:
        raise ValueError(f"config.diffusion.caption_dropout={d.caption_dropout} must be in [0, 1).")
    if d.logsnr_min >= d.logsnr_max:
        raise ValueError(
            f"config.diffusion.logsnr_min ({d.logsnr_min}) must be < logsnr_max ({d.logsnr_max})."
        )
    _choice(o.name, ("adamw", "adafactor"), "optim.name")
    _choice(o.decay, ("cosine", "constant"), "optim.decay")
    _positive(o.learning_rate, "optim.learning_rate")
    if not 0.0 <= o.ema_decay < 1.0:
        raise ValueError(f"config.optim.ema_decay={o.ema_decay} must be in [0, 1).")
    _choice(s.sampler, samplers.SAMPLERS, "sample.sampler")
    _choice(s.time_grid, samplers.TIME_GRIDS, "sample.time_grid")
    _choice(s.threshold, THRESHOLD_KINDS, "sample.threshold")
    _positive(s.num_steps, "sample.num_steps")
    for key in ("batch_size", "num_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(t[key], f"train.{key}")
    _positive(t.sample_every, "train.sample_every", allow_zero=True)
    _positive(t.time_budget_minutes, "train.time_budget_minutes", allow_zero=True)
    for key, section in (("data", config.data), ("eval", config.get("eval", {}))):
        p_two = section.get("two_object_prob", 0.0)
        if not 0.0 <= p_two <= 1.0:
            raise ValueError(f"config.{key}.two_object_prob={p_two} must be a probability in [0, 1].")
    for backend, spec in config.get("xla_options", {}).items():
        xla_options.parse_options(spec, key=f"xla_options.{backend}")
    _choice(config.model.dtype, COMPUTE_DTYPES, "model.dtype")
    _choice(config.model.param_dtype, COMPUTE_DTYPES[1:], "model.param_dtype")
    xla_options.check_model_dtype(config.get("xla_options"), compute_dtype(config.model.dtype))
    _check_attention(config.model)
    res, patch = config.data.resolution, config.model.patch_size
    factor = patch * 2 ** (len(config.model.channel_mults) - 1)
    if res % factor:
        raise ValueError(
            f"config.data.resolution={res} is not divisible by model.patch_size * 2^(levels-1) = {factor}."
        )


def _check_attention(model: ml_collections.ConfigDict) -> None:
    impl = model.get("attention_impl", "xla")  # configs from older checkpoints lack the key
    _choice(impl, ("xla", "cudnn"), "model.attention_impl")
    backend, dtype = jax.default_backend(), compute_dtype(model.dtype)
    if impl == "cudnn" and (backend != "gpu" or dtype not in ("bfloat16", "float16")):
        raise ValueError(
            f"config.model.attention_impl='cudnn' needs an NVIDIA GPU and bf16/fp16 compute (here: "
            f"{backend}, {dtype}); use --config.model.attention_impl=xla."
        )
