"""Sampling one stage: prompts (and, for a super-resolution stage, low-res images) in, uint8 images out.

The jitted program compiles once per batch shape: the sampler, the number of steps, the time grid, the
thresholding and its percentile, the guidance weight, eta and the noise-augmentation level are all traced
arguments, so sweeping them does not recompile (nor miss the persistent compilation cache). A super-resolution
stage samples at its full resolution whatever crop size it trained on (the U-Net is convolutional), so it
compiles once per resolution. Classifier-free guidance drops only the text: the (augmented) low-res image
and its level are the same in both branches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from imagen_jax.data.pipeline import to_model_range
from imagen_jax.diffusion import choice, noise_aug, samplers
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.errors import ConfigError, NonFiniteError
from imagen_jax.models.unet import UNet
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import xla_options
from imagen_jax.stage.build import Stage
from imagen_jax.stage.images import to_uint8
from imagen_jax.text.encoder import encode_tokens

_SAMPLE_STATIC = ("unet", "schedule", "objective", "shape")


@functools.cache
def _jitted_sample(options: tuple[tuple[str, xla_options.OptionValue], ...]) -> Any:
    return jax.jit(_sample, static_argnames=_SAMPLE_STATIC, compiler_options=dict(options))


def sample_program(options: Any) -> Any:
    """The jitted sampling loop with the compiler options of `options` (a config's `xla_options`
    section, per backend); one jitted function (and program cache) per distinct set of options, so
    stages that share options share compiled programs."""
    return _jitted_sample(tuple(sorted(xla_options.compiler_options(options).items())))


def sample_options(
    *, sampler: str, num_steps: int, time_grid: str, threshold: str, percentile: float
) -> tuple[jax.Array, ...]:
    """The sampling options as the program's run-time inputs (the arguments after `eta`), checked."""
    if num_steps < 1:
        raise ConfigError(f"{num_steps} sampling steps: use at least 1.")
    if not 0.0 < percentile <= 100.0:
        raise ConfigError(f"thresholding percentile {percentile}: use a value in (0, 100].")
    try:
        return (
            choice.index_of(sampler, samplers.SAMPLERS, "sampler"),
            jnp.int32(num_steps),
            choice.index_of(time_grid, samplers.TIME_GRIDS, "time grid"),
            choice.index_of(threshold, THRESHOLD_KINDS, "thresholding"),
            jnp.float32(percentile),
        )
    except ValueError as e:  # an unknown name
        raise ConfigError(str(e)) from None


_encode = jax.jit(encode_tokens, static_argnums=0)


def guided_denoiser(
    unet: UNet,
    unet_params: Any,
    text_emb: jax.Array,
    text_mask: jax.Array,
    *,
    objective: str,
    guidance: float | jax.Array,
    threshold: choice.Choice,
    percentile: float | jax.Array,
    lowres: jax.Array | None = None,
    aug_logsnr: jax.Array | None = None,
) -> samplers.DenoiseFn:
    """The classifier-free guided denoiser the samplers call: the U-Net on the text and on the null text
    (zero embeddings, empty mask), combined with weight `guidance` and thresholded (`make_denoise_fn`)."""
    cond = (text_emb, text_mask, lowres, aug_logsnr)
    uncond = (jnp.zeros_like(text_emb), jnp.zeros_like(text_mask), lowres, aug_logsnr)

    def model_fn(z: jax.Array, logsnr: jax.Array, c: Any) -> jax.Array:
        emb, mask, low, aug = c
        kwargs = {} if low is None else dict(lowres=low, aug_logsnr=aug)
        return unet.apply({"params": unet_params}, z, logsnr, emb, mask, **kwargs)

    return samplers.make_denoise_fn(
        model_fn,
        objective=objective,
        cond=cond,
        uncond=uncond,
        guidance_weight=guidance,
        threshold=threshold,
        percentile=percentile,
    )


def _sample(
    unet_params: Any,
    text_emb: jax.Array,
    text_mask: jax.Array,
    lowres: jax.Array | None,
    aug_level: jax.Array,
    rng: jax.Array,
    guidance: jax.Array,
    eta: jax.Array,
    sampler: jax.Array,
    num_steps: jax.Array,
    time_grid: jax.Array,
    threshold: jax.Array,
    percentile: jax.Array,
    *,
    unet: UNet,
    schedule: Any,
    objective: str,
    shape: tuple[int, ...],
) -> jax.Array:
    """The program `sample_program` compiles; the five inputs after `eta` are `sample_options`'."""
    aug_logsnr = None
    if lowres is not None:
        aug_rng, rng = jax.random.split(rng)
        lowres, aug_logsnr = noise_aug.augment(lowres, aug_level, aug_rng, schedule)
    denoise = guided_denoiser(
        unet, unet_params, text_emb, text_mask, objective=objective, guidance=guidance,
        threshold=threshold, percentile=percentile, lowres=lowres, aug_logsnr=aug_logsnr,
    )
    return samplers.sample(
        denoise,
        shape=shape,
        rng=rng,
        schedule=schedule,
        sampler=sampler,
        num_steps=num_steps,
        eta=eta,
        time_grid=time_grid,
    )


def encode_prompts(stage: Stage, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
    """(text embeddings [N, L, D] float32, mask [N, L]) of `prompts` with this stage's encoder; another
    stage with the same encoder (`same_text_encoder`) can sample from them without encoding again."""
    tokens = stage.text.tokenizer(list(prompts))
    ids, mask = jnp.asarray(tokens["text_ids"]), jnp.asarray(tokens["text_mask"])
    return _encode(stage.text.module, stage.text_params, ids, mask), mask


def _on_batch_axes(stage: Stage, x: Any) -> jax.Array:
    return jax.device_put(x, mesh_lib.batch_sharding(stage.mesh, stage.rules, np.ndim(x)))


def _to_host(x: jax.Array) -> np.ndarray:
    """The whole array on this host; across hosts every process gets every shard (a collective)."""
    if x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _pad(x: Any, size: int) -> Any:
    x = np.asarray(x)
    return np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)]) if len(x) < size else x


def generate(
    stage: Stage,
    prompts: Sequence[str],
    *,
    rng: jax.Array,
    lowres: np.ndarray | None = None,
    text: tuple[Any, Any] | None = None,
    aug_level: float | None = None,
    guidance: float | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    threshold: str | None = None,
    percentile: float | None = None,
    time_grid: str | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Samples one image per prompt (uint8 [N, R, R, 3]); unset options come from `config.sample`.

    A super-resolution stage needs `lowres`: one image per prompt, uint8 [N, r, r, 3], normally at the
    stage's input resolution (e.g. the previous stage's output), noised to `aug_level` (default
    `config.sample.noise_aug_level`). The stage is convolutional, so any r works and the output is r times
    the stage's factor (a crop-trained stage given whole images samples whole images; training previews
    sample crops). `text` = (embeddings, mask) from `encode_prompts` skips encoding.
    Prompts run in batches of `batch_size` (default: all), padded to a multiple of the devices the
    batch splits over; the parameters stay sharded as loaded (a model too big for one device samples on
    its mesh). Across hosts every process calls this with the same prompts and gets all images. An empty
    prompt is the unconditional one.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("generate() needs a non-empty list of prompts (use '' for an unconditional sample).")
    s = stage.config.sample
    res = stage.resolution
    if stage.lowres_resolution:
        side = np.shape(lowres)[1] if lowres is not None and np.ndim(lowres) == 4 else 0
        expected = (len(prompts), side, side, 3)
        if lowres is None or tuple(np.shape(lowres)) != expected or side == 0:
            got = "none" if lowres is None else tuple(np.shape(lowres))
            raise ConfigError(
                f"this super-resolution stage samples from low-res images [{len(prompts)}, r, r, 3] (one per "
                f"prompt, normally r = config.data.lowres_resolution = {stage.lowres_resolution}), got {got}."
            )
        res = side * stage.resolution // stage.lowres_resolution
        aug_level = float(s.get("noise_aug_level", 0.0) if aug_level is None else aug_level)
        if not 0.0 <= aug_level <= 1.0:
            raise ConfigError(f"noise augmentation level {aug_level} is outside [0, 1].")
    elif lowres is not None:
        raise ConfigError("a base stage (config.data.lowres_resolution=0) takes no low-res images.")
    guidance = s.guidance if guidance is None else guidance
    sampler = s.sampler if sampler is None else sampler
    num_steps = int(s.num_steps if num_steps is None else num_steps)
    eta = float(s.eta if eta is None else eta)
    if not 0.0 <= eta <= 1.0:  # past 1 a DDIM step adds more noise than the posterior has: speckle
        raise ConfigError(f"DDIM eta {eta}: use a value in [0, 1] (0 deterministic, 1 DDPM's variance).")
    options = sample_options(
        sampler=sampler,
        num_steps=num_steps,
        time_grid=s.time_grid if time_grid is None else time_grid,
        threshold=s.threshold if threshold is None else threshold,
        percentile=float(s.percentile if percentile is None else percentile),
    )
    shards = mesh_lib.batch_shards(stage.mesh, stage.rules)
    batch_size = batch_size or len(prompts)
    batch_size = -(-batch_size // shards) * shards
    sample_fn = sample_program(stage.config.get("xla_options"))
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        if text is None:
            emb, mask = encode_prompts(stage, chunk + [""] * (batch_size - len(chunk)))
        else:
            emb, mask = (_pad(t[start : start + batch_size], batch_size) for t in text)
        emb, mask = (_on_batch_axes(stage, t) for t in (emb, mask))
        low = None
        if lowres is not None:
            low = to_model_range(_pad(lowres[start : start + batch_size], batch_size))
            low = _on_batch_axes(stage, low)
        images = sample_fn(
            stage.params["unet"],
            emb,
            mask,
            low,
            jnp.float32(aug_level or 0.0),
            jax.random.fold_in(rng, start),
            jnp.float32(guidance),
            jnp.float32(eta),
            *options,
            unet=stage.unet,
            schedule=stage.schedule,
            objective=stage.config.diffusion.objective,
            shape=(batch_size, res, res, 3),
        )
        images = _to_host(images)[: len(chunk)]
        if not np.isfinite(images).all():  # never write a grid of NaN images as if it were a sample
            raise NonFiniteError(
                "sampling produced NaN/inf pixels: the weights are non-finite or the sampler settings "
                f"diverge (guidance {guidance}, {sampler} with {num_steps} steps)."
            )
        out.append(to_uint8(images))
    return np.concatenate(out)
