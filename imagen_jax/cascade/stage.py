"""One cascade stage: U-Net + text encoder + diffusion settings; initialisation, loading and sampling.

The training loop and `sample.py` build a stage from the same config, so a checkpoint always meets the
model it was trained as. Sampling compiles once per (batch shape, sampler, steps, thresholding); the
guidance weight is a traced argument, so sweeping weights does not recompile.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from imagen_jax.cascade.images import to_uint8
from imagen_jax.diffusion import samplers
from imagen_jax.errors import ConfigError, NonFiniteError
from imagen_jax.models.unet import UNet, unet_from_config
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import xla_options
from imagen_jax.text.encoder import TextEncoder, build_text_encoder, encode_tokens
from imagen_jax.training import checkpoint
from imagen_jax.training.state import TrainState, create_train_state, make_optimizer
from imagen_jax.training.step import schedule_from_config


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    config: ml_collections.ConfigDict
    unet: UNet
    text: TextEncoder
    mesh: Mesh
    params: Any = None  # {"unet": ..., "text": ... (jointly trained only)}; EMA weights when loaded

    @property
    def text_params(self) -> Any:
        return self.params["text"] if self.config.text.train_jointly else self.text.params


def build_stage(config: ml_collections.ConfigDict, mesh: Mesh | None = None) -> Stage:
    """Modules for `config` (no U-Net weights yet); the text encoder's frozen weights are loaded/seeded."""
    mesh = mesh or mesh_lib.make_mesh(config.mesh)
    text = build_text_encoder(config.text, mesh=mesh, rules=config.axis_rules)
    if config.text.train_jointly and config.text.encoder != "random":
        raise ConfigError(
            "config.text.train_jointly=True is only supported for the seeded 'random' encoder; a pretrained "
            f"T5 ({config.text.encoder!r}) stays frozen as in Imagen. Set config.text.train_jointly=False."
        )
    return Stage(config=config, unet=unet_from_config(config.model), text=text, mesh=mesh)


def _dummy_inputs(stage: Stage, batch: int = 1) -> tuple[jax.Array, ...]:
    res = stage.config.data.resolution
    length = stage.text.max_length
    return (
        jnp.zeros((batch, res, res, 3), jnp.float32),
        jnp.zeros((batch,), jnp.float32),
        jnp.zeros((batch, length, stage.text.embed_dim), jnp.float32),
        jnp.ones((batch, length), bool),
    )


def _state_factory(stage: Stage, optimizer: optax.GradientTransformation, rng: jax.Array) -> Any:
    """`make(text_params) -> TrainState` with boxed (logically annotated) U-Net parameters."""
    init_rng, state_rng = jax.random.split(rng)

    def make(text_params: Any) -> TrainState:
        params = {"unet": stage.unet.init(init_rng, *_dummy_inputs(stage))["params"]}
        if stage.config.text.train_jointly:
            params["text"] = text_params
        return create_train_state(params, optimizer, state_rng)

    return make


def _state_shardings(stage: Stage, make: Any) -> tuple[Any, Any]:
    """(abstract boxed state, shardings) from shapes alone: nothing is computed or allocated.

    optax keeps the logical boxes, so the optimizer moments get the same names as their parameters.
    """
    text = None
    if stage.config.text.train_jointly:
        ids = jnp.zeros((1, stage.text.max_length), jnp.int32)
        text = jax.eval_shape(lambda: stage.text.module.init(jax.random.PRNGKey(0), ids, ids > 0)["params"])
    abstract = jax.eval_shape(make, text)
    return abstract, mesh_lib.tree_shardings(abstract, stage.mesh, stage.config.axis_rules)


def init_train_state(
    stage: Stage, optimizer: optax.GradientTransformation, rng: jax.Array
) -> tuple[TrainState, Any]:
    """A fresh train state created directly with its shardings (no unsharded copy), and those shardings."""
    make = _state_factory(stage, optimizer, rng)
    _, shardings = _state_shardings(stage, make)
    text_params = stage.text.params if stage.config.text.train_jointly else None
    state = jax.jit(lambda tp: nn.unbox(make(tp)), out_shardings=shardings)(text_params)
    return state, shardings


def abstract_train_state(stage: Stage, optimizer: optax.GradientTransformation) -> tuple[Any, Any]:
    """ShapeDtypeStructs (with shardings) of the train state, for restoring without initialising."""
    abstract, shardings = _state_shardings(stage, _state_factory(stage, optimizer, jax.random.PRNGKey(0)))
    structs = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract), shardings
    )
    return structs, shardings


def load_stage(
    workdir: str,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    mesh: Mesh | None = None,
    use_ema: bool = True,
) -> Stage:
    """The stage trained in `workdir` with its (EMA) weights, from the newest checkpoint that verifies
    (a damaged newer one is named in a warning; an explicit `step` must verify). The config comes from
    the checkpoint unless given. Its samplers compile through the run's compilation cache."""
    built: list[Stage] = []

    def abstract_state(cfg: ml_collections.ConfigDict) -> Any:
        built.append(build_stage(cfg, mesh))
        return abstract_train_state(built[-1], make_optimizer(cfg.optim, cfg.train.num_steps))[0]

    restored, _ = checkpoint.restore_newest_good(workdir, abstract_state, config, step)
    stage = built[-1]
    xla_options.use_compilation_cache(stage.config, workdir)
    params = restored.state.ema_params if use_ema else restored.state.params
    return dataclasses.replace(stage, params=params)


_SAMPLE_STATIC = (
    "unet",
    "text_module",
    "schedule",
    "objective",
    "sampler",
    "num_steps",
    "threshold",
    "percentile",
    "time_grid",
    "shape",
)


@functools.cache
def _jitted_sample(options: tuple[tuple[str, xla_options.OptionValue], ...]) -> Any:
    return jax.jit(_sample, static_argnames=_SAMPLE_STATIC, compiler_options=dict(options))


def sample_program(config: ml_collections.ConfigDict) -> Any:
    """The jitted sampling loop with `config`'s XLA options; one jitted function (and program cache) per
    distinct set of options, so stages that share options share compiled programs."""
    options = xla_options.compiler_options(config.get("xla_options"))
    return _jitted_sample(tuple(sorted(options.items())))


def _sample(
    unet_params: Any,
    text_params: Any,
    text_ids: jax.Array,
    text_mask: jax.Array,
    rng: jax.Array,
    guidance: jax.Array,
    eta: jax.Array,
    *,
    unet: UNet,
    text_module: Any,
    schedule: Any,
    objective: str,
    sampler: str,
    num_steps: int,
    threshold: str,
    percentile: float,
    time_grid: str,
    shape: tuple[int, ...],
) -> jax.Array:
    emb = encode_tokens(text_module, text_params, text_ids, text_mask)
    null = (jnp.zeros_like(emb), jnp.zeros_like(text_mask))

    def model_fn(z: jax.Array, logsnr: jax.Array, cond: Any) -> jax.Array:
        return unet.apply({"params": unet_params}, z, logsnr, cond[0], cond[1])

    denoise = samplers.make_denoise_fn(
        model_fn,
        objective=objective,
        cond=(emb, text_mask),
        uncond=null,
        guidance_weight=guidance,
        threshold=threshold,
        percentile=percentile,
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


def generate(
    stage: Stage,
    prompts: Sequence[str],
    *,
    rng: jax.Array,
    guidance: float | None = None,
    sampler: str | None = None,
    num_steps: int | None = None,
    eta: float | None = None,
    threshold: str | None = None,
    percentile: float | None = None,
    time_grid: str | None = None,
    batch_size: int | None = None,
) -> np.ndarray:
    """Samples one image per prompt (uint8 [N, H, W, 3]); unset options come from `config.sample`.

    Prompts run in batches of `batch_size` (default: all), padded to a multiple of the data-parallel
    devices; an empty prompt is the unconditional one.
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError("generate() needs a non-empty list of prompts (use '' for an unconditional sample).")
    s = stage.config.sample
    guidance = s.guidance if guidance is None else guidance
    opts = dict(
        sampler=s.sampler if sampler is None else sampler,
        num_steps=int(s.num_steps if num_steps is None else num_steps),
        threshold=s.threshold if threshold is None else threshold,
        percentile=float(s.percentile if percentile is None else percentile),
        time_grid=s.time_grid if time_grid is None else time_grid,
    )
    eta = s.eta if eta is None else eta
    if opts["sampler"] not in samplers.SAMPLERS:
        raise ConfigError(f"sampler {opts['sampler']!r}: use one of {samplers.SAMPLERS}.")
    devices = stage.mesh.devices.size
    batch_size = batch_size or len(prompts)
    batch_size = -(-batch_size // devices) * devices
    res = stage.config.data.resolution
    batch_sharding = mesh_lib.batch_sharding(stage.mesh, stage.config.axis_rules, 2)
    schedule = schedule_from_config(stage.config.diffusion)
    sample_fn = sample_program(stage.config)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start : start + batch_size])
        tokens = stage.text.tokenizer(chunk + [""] * (batch_size - len(chunk)))
        ids, mask = (jax.device_put(tokens[k], batch_sharding) for k in ("text_ids", "text_mask"))
        images = sample_fn(
            stage.params["unet"],
            stage.text_params,
            ids,
            mask,
            jax.random.fold_in(rng, start),
            jnp.float32(guidance),
            jnp.float32(eta),
            unet=stage.unet,
            text_module=stage.text.module,
            schedule=schedule,
            objective=stage.config.diffusion.objective,
            shape=(batch_size, res, res, 3),
            **opts,
        )
        images = jax.device_get(images)[: len(chunk)]
        if not np.isfinite(images).all():  # never write a grid of NaN images as if it were a sample
            raise NonFiniteError(
                "sampling produced NaN/inf pixels: the weights are non-finite or the sampler settings "
                f"diverge (guidance {guidance}, {opts['sampler']} with {opts['num_steps']} steps)."
            )
        out.append(to_uint8(images))
    return np.concatenate(out)
