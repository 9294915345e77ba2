"""Up-front checks of a config's values, so mistakes fail before any compilation with one clear message.

Every failure is a `ConfigError` (a ValueError) naming the key; `train.py` prints it as one line.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import ml_collections

from imagen_jax.data.sources import check_stage_data
from imagen_jax.diffusion import objectives, samplers, schedules
from imagen_jax.diffusion.guidance import THRESHOLD_KINDS
from imagen_jax.errors import ConfigError
from imagen_jax.models.unet import COMPUTE_DTYPES, check_channel_mults, compute_dtype, unet_from_config
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import xla_options
from imagen_jax.text import pretrain
from imagen_jax.text.build import LEARNED_TOKENIZER, PRETRAINED_IN_RUN


def _choice(value: object, allowed: tuple, key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"config.{key}={value!r} is not one of {list(allowed)}.")


def _positive(value: float, key: str, *, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"config.{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}.")


def _probability(value: float, key: str) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"config.{key}={value} must be a probability in [0, 1].")


def validate_config(config: ml_collections.ConfigDict) -> None:
    d, t, o, s = config.diffusion, config.train, config.optim, config.sample
    _choice(d.schedule, schedules.SCHEDULE_NAMES, "diffusion.schedule")
    _choice(d.objective, objectives.OBJECTIVES, "diffusion.objective")
    _choice(d.loss_weighting, objectives.WEIGHTINGS, "diffusion.loss_weighting")
    if not 0.0 <= d.caption_dropout < 1.0:
        raise ConfigError(f"config.diffusion.caption_dropout={d.caption_dropout} must be in [0, 1).")
    if d.loss_weighting == "min_snr":
        _positive(d.min_snr_gamma, "diffusion.min_snr_gamma")
    if d.logsnr_min >= d.logsnr_max:
        raise ConfigError(
            f"config.diffusion.logsnr_min ({d.logsnr_min}) must be < logsnr_max ({d.logsnr_max})."
        )
    span = d.logsnr_max - d.logsnr_min
    if not abs(d.train_logsnr_shift) < span:
        raise ConfigError(
            f"config.diffusion.train_logsnr_shift={d.train_logsnr_shift} would put every training level at "
            f"one end of [logsnr_min, logsnr_max]: use a shift of magnitude below {span:g} (e.g. -2)."
        )
    levels = tuple(d.noise_aug_range) if _is_tuple_of(d.noise_aug_range, (int, float)) else ()
    if len(levels) != 2 or not 0.0 <= levels[0] <= levels[1] <= 1.0:
        raise ConfigError(
            f"config.diffusion.noise_aug_range={d.noise_aug_range!r} must be (low, high) with "
            "0 <= low <= high <= 1 (times on the stage's schedule), e.g. (0.0, 0.5)."
        )
    if not 0.0 <= s.noise_aug_level <= 1.0:
        raise ConfigError(f"config.sample.noise_aug_level={s.noise_aug_level} must be in [0, 1].")
    check_stage_data(config.data)
    _choice(o.name, ("adamw", "adafactor"), "optim.name")
    _choice(o.decay, ("cosine", "constant"), "optim.decay")
    _positive(o.learning_rate, "optim.learning_rate")
    for key in ("warmup_steps", "end_lr_factor", "weight_decay", "grad_clip"):  # grad_clip 0: no clipping
        _positive(o[key], f"optim.{key}", allow_zero=True)
    for key in ("b1", "b2"):
        if not 0.0 <= o[key] < 1.0:
            raise ConfigError(f"config.optim.{key}={o[key]} must be in [0, 1) (a moment's decay).")
    if not 0.0 <= o.ema_decay < 1.0:
        raise ConfigError(f"config.optim.ema_decay={o.ema_decay} must be in [0, 1).")
    _choice(s.sampler, samplers.SAMPLERS, "sample.sampler")
    _choice(s.time_grid, samplers.TIME_GRIDS, "sample.time_grid")
    _choice(s.threshold, THRESHOLD_KINDS, "sample.threshold")
    _positive(s.num_steps, "sample.num_steps")
    if not 0.0 <= s.eta <= 1.0:
        raise ConfigError(f"config.sample.eta={s.eta} must be in [0, 1] (0: deterministic DDIM).")
    if not 0.0 < s.percentile <= 100.0:
        raise ConfigError(f"config.sample.percentile={s.percentile} must be in (0, 100].")
    for key in ("batch_size", "grad_accum_steps", "num_steps", "log_every", "checkpoint_every"):
        _positive(t[key], f"train.{key}")
    _positive(t.stop_check_every, "train.stop_check_every")
    _positive(t.keep_checkpoints, "train.keep_checkpoints")
    if t.batch_size % t.grad_accum_steps:
        raise ConfigError(
            f"config.train.batch_size={t.batch_size} does not split into "
            f"config.train.grad_accum_steps={t.grad_accum_steps} equal micro-batches; make it a multiple."
        )
    _positive(t.sample_every, "train.sample_every", allow_zero=True)
    _positive(t.time_budget_minutes, "train.time_budget_minutes", allow_zero=True)
    if config.text.max_length < 2:
        raise ConfigError(f"config.text.max_length={config.text.max_length} must be >= 2 (a token and EOS).")
    for key in ("num_captions", "batch_size"):
        if key in config.get("eval", {}):
            _positive(config.eval[key], f"eval.{key}")
    for key, section in (("data", config.data), ("eval", config.get("eval", {}))):
        _probability(section.get("two_object_prob", 0.0), f"{key}.two_object_prob")
    made_up = config.data.get("made_up_words")
    if made_up is not None:
        _probability(made_up.prob, "data.made_up_words.prob")
        _positive(made_up.max_words, "data.made_up_words.max_words")
    _check_mesh(config)
    _check_text_pretraining(config.text, config.data.name)
    _check_learned_tokenizer(config.text)
    if t.sample_every and not _is_tuple_of(t.sample_prompts, str, nonempty=True):
        raise ConfigError(
            f"config.train.sample_prompts={t.sample_prompts!r} must be a non-empty tuple of strings when "
            "train.sample_every > 0, e.g. --config.train.sample_prompts=\"('a red circle', '')\"."
        )
    _choice(config.model.dtype, COMPUTE_DTYPES, "model.dtype")
    _choice(config.model.param_dtype, COMPUTE_DTYPES[1:], "model.param_dtype")
    cache_seconds = config.get("compilation_cache_min_compile_seconds", 0.0)
    _positive(cache_seconds, "compilation_cache_min_compile_seconds", allow_zero=True)
    for backend, spec in config.get("xla_options", {}).items():
        xla_options.parse_options(spec, key=f"xla_options.{backend}")
    xla_options.check_model_dtype(config.get("xla_options"), compute_dtype(config.model.dtype))
    _check_levels(config.model)
    unet_from_config(config.model)  # constructing the U-Net checks its fields (unet._check_fields)
    _check_attention(config.model)
    if config.model.get("image_positions", False) and config.data.get("crop_resolution", 0):
        raise ConfigError(
            "config.model.image_positions=True tells the U-Net where each pixel sits in the image, which a "
            f"crop (config.data.crop_resolution={config.data.crop_resolution}) does not: set one of them off."
        )
    res, patch = config.data.resolution, config.model.patch_size
    factor = patch * 2 ** (len(config.model.channel_mults) - 1)
    if res % factor:
        raise ConfigError(
            f"config.data.resolution={res} is not divisible by model.patch_size * 2^(levels-1) = {factor}."
        )


def _check_text_pretraining(text: ml_collections.ConfigDict, data_name: str) -> None:
    if text.encoder != PRETRAINED_IN_RUN:
        return
    if text.train_jointly:
        raise ConfigError(
            f"config.text.encoder={PRETRAINED_IN_RUN!r} pretrains the T5 and then freezes it: set "
            "config.text.train_jointly=False."
        )
    pt = text.pretrain
    for key in ("num_steps", "batch_size", "log_every"):
        _positive(pt[key], f"text.pretrain.{key}")
    _positive(pt.learning_rate, "text.pretrain.learning_rate")
    _positive(pt.decoder_layers, "text.pretrain.decoder_layers", allow_zero=True)
    _positive(pt.time_budget_minutes, "text.pretrain.time_budget_minutes", allow_zero=True)
    try:
        pretrain.check_noise_args(pt.noise_density, pt.mean_span_length)
        pretrain.check_loss_weights(pt.span_weight, pt.tag_weight)
    except ConfigError as e:
        raise ConfigError(f"config.text.pretrain: {e}") from None
    if pt.tag_weight > 0 and data_name != "shapes":
        raise ConfigError(
            f"config.text.pretrain.tag_weight={pt.tag_weight} tags the words of each training scene, "
            f"which only the shapes dataset records (data.name={data_name!r}): set "
            "--config.text.pretrain.tag_weight=0."
        )


def _check_learned_tokenizer(text: ml_collections.ConfigDict) -> None:
    if text.tokenizer != LEARNED_TOKENIZER:
        return
    if text.encoder not in ("random", PRETRAINED_IN_RUN):
        raise ConfigError(
            f"config.text.tokenizer={LEARNED_TOKENIZER!r} learns a vocabulary for a T5 made in the run; "
            f"the checkpoint {text.encoder!r} reads its own: set config.text.tokenizer=''."
        )
    learned = text.learned_tokenizer
    _choice(learned.model_type, ("bpe", "unigram"), "text.learned_tokenizer.model_type")
    if not 259 < learned.vocab_size <= text.t5.vocab_size:
        raise ConfigError(
            f"config.text.learned_tokenizer.vocab_size={learned.vocab_size} must exceed 259 (pad, EOS, "
            f"unknown and 256 bytes) and fit the T5's embedding table, config.text.t5.vocab_size="
            f"{text.t5.vocab_size}."
        )


def _check_attention(model: ml_collections.ConfigDict) -> None:
    impl = model.get("attention_impl", "xla")  # configs from older checkpoints lack the key
    _choice(impl, ("xla", "cudnn"), "model.attention_impl")
    backend, dtype = jax.default_backend(), compute_dtype(model.dtype)
    if impl == "cudnn" and (backend != "gpu" or dtype not in ("bfloat16", "float16")):
        raise ConfigError(
            f"config.model.attention_impl='cudnn' needs an NVIDIA GPU and bf16/fp16 compute (here: "
            f"{backend}, {dtype}); use --config.model.attention_impl=xla."
        )


def _is_tuple_of(value: object, kind: type | tuple[type, ...], *, nonempty: bool = False) -> bool:
    # Lists too: a config read back from a checkpoint's JSON holds lists.
    return (
        isinstance(value, (tuple, list))
        and all(isinstance(v, kind) for v in value)
        and (bool(value) or not nonempty)
    )


def _is_mesh_axis(pair: object) -> bool:
    return (
        isinstance(pair, (tuple, list))
        and len(pair) == 2
        and isinstance(pair[0], str)
        and isinstance(pair[1], int)
        and not isinstance(pair[1], bool)
        and (pair[1] >= 1 or pair[1] == -1)
    )


def _is_rule(pair: object) -> bool:
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2 and isinstance(pair[0], str)):
        return False
    # A logical axis maps to None (replicated), a mesh axis, or a tuple of mesh axes.
    target = pair[1]
    return target is None or isinstance(target, str) or _is_tuple_of(target, str, nonempty=True)


def _check_pairs(value: object, key: str, example: str, ok: Callable[[object], bool]) -> None:
    """`config.mesh` / `config.sharding.rules` are tuples of pairs. A common command-line slip is one pair
    without the outer tuple (`--config.mesh="('data', 1)"`), which ml_collections accepts as a flat tuple."""
    if not _is_tuple_of(value, (tuple, list), nonempty=True) or not all(ok(p) for p in value):
        what = "(axis name, size >= 1 or -1)" if key == "mesh" else "(logical axis, mesh axis or None)"
        raise ConfigError(
            f"config.{key}={value!r} must be a non-empty tuple of {what} pairs, e.g. "
            f'--config.{key}="{example}" (note the trailing comma of a one-pair tuple).'
        )


def _check_mesh(config: ml_collections.ConfigDict) -> None:
    _check_pairs(config.mesh, "mesh", "(('data', -1), ('fsdp', 1), ('tensor', 1))", _is_mesh_axis)
    if config.mesh_dcn:
        _check_pairs(config.mesh_dcn, "mesh_dcn", "(('data', 2),)", _is_mesh_axis)
    sharding = config.sharding
    _choice(sharding.preset, tuple(mesh_lib.PRESETS), "sharding.preset")
    if sharding.rules:
        _check_pairs(sharding.rules, "sharding.rules", "(('mlp', 'tensor'),)", _is_rule)
    _positive(sharding.min_shard_size, "sharding.min_shard_size", allow_zero=True)
    mesh_axes = [name for name, _ in config.mesh]
    for name in mesh_axes:
        if name not in mesh_lib.MESH_AXES:
            raise ConfigError(
                f"config.mesh axis {name!r} is not one of {mesh_lib.MESH_AXES}: the sharding presets place "
                "arrays on those axes."
            )
    for key, pairs in (("mesh_dcn", config.mesh_dcn), ("sharding.rules", sharding.rules)):
        for logical, target in pairs or ():
            for name in [target] if isinstance(target, str) else target or ():
                if name not in mesh_axes:
                    raise ConfigError(
                        f"config.{key} names mesh axis {name!r} (for {logical!r}), which config.mesh="
                        f"{tuple(map(tuple, config.mesh))!r} does not have; mesh axes: {mesh_axes}."
                    )


def _check_levels(model: ml_collections.ConfigDict) -> None:
    """Per-level settings must match model.channel_mults, so overriding the multipliers alone fails here
    (naming the keys to change with it) rather than inside the model."""
    mults = check_channel_mults(model.channel_mults)
    for key in ("num_res_blocks", "self_attention", "cross_attention"):
        value = model.get(key)
        if isinstance(value, (tuple, list)) and len(value) != len(mults):
            raise ConfigError(
                f"config.model.{key}={tuple(value)!r} has {len(value)} entries but model.channel_mults="
                f"{tuple(mults)!r} has {len(mults)} levels; override both, e.g. "
                f'--config.model.{key}="{tuple(value[:1]) * len(mults)!r}".'
            )
