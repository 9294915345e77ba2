"""One cascade stage: U-Net + text encoder + diffusion settings, its parameters, and loading it to sample.

Training, the cascade pipeline and evaluation build a stage from the same config, so a checkpoint always
meets the model it was trained as. Loading restores only the weights sampling uses (the EMA item): no
optimizer state is built or read, so three stages in one process pay for three sets of weights only.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from imagen_jax.diffusion import schedules
from imagen_jax.errors import ConfigError
from imagen_jax.models.unet import UNet, convert_layout, unet_from_config
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.parallel import xla_options
from imagen_jax.stage import checkpoint, stacking
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.encoder import TextEncoder


@dataclasses.dataclass(frozen=True, eq=False)
class Stage:
    config: ml_collections.ConfigDict
    unet: UNet
    text: TextEncoder
    mesh: Mesh
    params: Any = None  # {"unet": ..., "text": ... (jointly trained only)}; EMA weights when loaded
    step: int | None = None  # the checkpoint step the weights come from (None: not loaded)

    @property
    def text_params(self) -> Any:
        return self.params["text"] if self.config.text.train_jointly else self.text.params

    @property
    def rules(self) -> mesh_lib.AxisRules:
        """How parameters, state and batches are placed on `mesh` (`config.sharding`; checkpoints written
        before sharding presets existed were data-parallel)."""
        return mesh_lib.axis_rules(self.config.get("sharding"))

    @property
    def resolution(self) -> int:
        """The side of the images this stage samples (training may use crops of it)."""
        return int(self.config.data.resolution)

    @property
    def lowres_resolution(self) -> int:
        """The side of the low-res image a super-resolution stage starts from; 0 for a base stage."""
        return int(self.config.data.get("lowres_resolution", 0))

    @property
    def kind(self) -> str:
        """What the stage is, for messages: 'a base stage (32x32)', 'a super-resolution stage (32 -> 128)'."""
        if self.lowres_resolution:
            return f"a super-resolution stage ({self.lowres_resolution} -> {self.resolution})"
        return f"a base stage ({self.resolution}x{self.resolution})"

    @functools.cached_property
    def schedule(self) -> schedules.Schedule:
        return schedule_from_config(self.config.diffusion)


def schedule_from_config(diffusion: ml_collections.ConfigDict) -> schedules.Schedule:
    """The log-SNR schedule of `config.diffusion` (shared by training, sampling and noise augmentation)."""
    return schedules.get_schedule(
        diffusion.schedule, logsnr_min=diffusion.logsnr_min, logsnr_max=diffusion.logsnr_max
    )


def build_stage(
    config: ml_collections.ConfigDict, mesh: Mesh | None = None, workdir: str | None = None
) -> Stage:
    """Modules for `config` (no U-Net weights yet); the text encoder's frozen weights are loaded/seeded
    (a T5 pretrained in the run from `workdir`)."""
    mesh = mesh or mesh_lib.make_mesh(config.mesh, dcn=config.get("mesh_dcn", ()))
    lowres = int(config.data.get("lowres_resolution", 0))
    if bool(config.model.lowres_cond) != (lowres > 0):
        raise ConfigError(
            f"config.model.lowres_cond={config.model.lowres_cond} but "
            f"config.data.lowres_resolution={lowres}: "
            "a super-resolution stage sets both (lowres_cond=True and the input resolution), a base stage "
            "neither."
        )
    rules = mesh_lib.axis_rules(config.get("sharding"))
    text = build_text_encoder(config.text, mesh=mesh, rules=rules, workdir=workdir)
    if config.text.train_jointly and config.text.encoder != "random":
        raise ConfigError(
            "config.text.train_jointly=True is only supported for the seeded 'random' encoder; a pretrained "
            f"T5 ({config.text.encoder!r}) stays frozen as in Imagen. Set config.text.train_jointly=False."
        )
    return Stage(config=config, unet=unet_from_config(config.model), text=text, mesh=mesh)


def unet_input_structs(
    data: ml_collections.ConfigDict, text_length: int, text_width: int, batch: int = 1
) -> tuple[tuple[jax.ShapeDtypeStruct, ...], dict[str, jax.ShapeDtypeStruct]]:
    """Shapes of the U-Net's inputs at the size a stage trains at, (args, kwargs): the noisy image (the
    crop, when `data.crop_resolution` is set), log-SNR, text embeddings and mask, and for a super-resolution
    stage (`data.lowres_resolution`) the matching low-res image and its augmentation log-SNR."""
    res = int(data.resolution)
    size = int(data.get("crop_resolution", 0)) or res
    args = (
        jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32),
        jax.ShapeDtypeStruct((batch,), jnp.float32),
        jax.ShapeDtypeStruct((batch, text_length, text_width), jnp.float32),
        jax.ShapeDtypeStruct((batch, text_length), jnp.bool_),
    )
    kwargs = {}
    lowres = int(data.get("lowres_resolution", 0))
    if lowres:
        low = size * lowres // res
        kwargs = dict(
            lowres=jax.ShapeDtypeStruct((batch, low, low, 3), jnp.float32),
            aug_logsnr=jax.ShapeDtypeStruct((batch,), jnp.float32),
        )
    return args, kwargs


def unet_inputs(stage: Stage, batch: int = 1) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
    """Zero inputs for initialising the stage's U-Net (see `unet_input_structs`); its parameters do not
    depend on the image size, so the smallest size the stage trains at is used."""
    args, kwargs = unet_input_structs(stage.config.data, stage.text.max_length, stage.text.embed_dim, batch)
    zeros = lambda s: jnp.zeros(s.shape, s.dtype)  # noqa: E731
    return tuple(map(zeros, args)), {k: zeros(v) for k, v in kwargs.items()}


def params_factory(stage: Stage, rng: jax.Array) -> Callable[[Any], Any]:
    """`make(text_params) -> {"unet": boxed params, ["text": text_params]}`: the stage's trainable weights.

    Boxed (logically annotated), so callers derive shardings from `jax.eval_shape(make, ...)` and create
    the arrays inside one jit with those `out_shardings`, never as an unsharded copy.

    A scanned U-Net gets the unrolled one's weights for the same `rng`, stacked (`nn.scan` would draw each
    block's from other random streams): `model.scan_blocks` changes the program, not the run.
    """
    unrolled = stage.unet.clone(scan_blocks=False)

    def make(text_params: Any) -> Any:
        args, kwargs = unet_inputs(stage)
        unet = unrolled.init(rng, *args, **kwargs)["params"]
        params = {"unet": convert_layout(unet, stage.unet, scanned=stage.unet.scan_blocks)}
        if stage.config.text.train_jointly:
            params["text"] = text_params
        return params

    return make


def abstract_text_params(stage: Stage) -> Any:
    """Shapes of the jointly trained text encoder's parameters (None when the encoder is frozen)."""
    if not stage.config.text.train_jointly:
        return None
    ids = jnp.zeros((1, stage.text.max_length), jnp.int32)
    return jax.eval_shape(lambda: stage.text.module.init(jax.random.PRNGKey(0), ids, ids > 0)["params"])


def params_structs(stage: Stage, stacked: bool = False) -> Any:
    """ShapeDtypeStructs with shardings of the stage's weights: the target a checkpoint restores into;
    `stacked`: as a run with `optim.stack_by_shape` holds them (`stacking.stack_parts`)."""
    make = params_factory(stage, jax.random.PRNGKey(0))
    abstract = jax.eval_shape(
        lambda tp: stacking.stack_parts(make(tp)) if stacked else make(tp), abstract_text_params(stage)
    )
    shardings = mesh_lib.tree_shardings(abstract, stage.mesh, stage.rules)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), nn.unbox(abstract), shardings
    )


def load_stage(
    workdir: str,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    mesh: Mesh | None = None,
    use_ema: bool = True,
    scan_blocks: bool | None = None,
) -> Stage:
    """The stage trained in `workdir` with its EMA (or raw, `use_ema=False`) weights only, from the newest
    checkpoint that verifies (a damaged newer one is named in a warning; an explicit `step` must verify).
    The config comes from the checkpoint unless given; weights stored stacked by shape
    (`optim.stack_by_shape`) are read in that layout whatever the given config says, and unstacked.
    `scan_blocks` converts the U-Net to the scanned
    (True) or unrolled (False) form whatever form it trained in (None: as trained). Its samplers compile
    through the run's compilation cache."""
    built: list[Stage] = []
    item = "ema_params" if use_ema else "params"

    def abstract_items(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
        built.append(build_stage(cfg, mesh, workdir))
        return {item: params_structs(built[-1], stacked=stacking.enabled(cfg))}

    restored, _ = checkpoint.restore_newest_good(workdir, abstract_items, config, step)
    stage = built[-1]
    params = stacking.unstacked(restored.items[item])
    if scan_blocks is not None and scan_blocks != stage.unet.scan_blocks:
        params = {**params, "unet": convert_layout(params["unet"], stage.unet, scanned=scan_blocks)}
        cfg = stage.config.copy_and_resolve_references()
        cfg.model.scan_blocks = scan_blocks
        stage = dataclasses.replace(stage, config=cfg, unet=stage.unet.clone(scan_blocks=scan_blocks))
    xla_options.use_compilation_cache(stage.config, workdir)
    return dataclasses.replace(stage, params=params, step=restored.step)
