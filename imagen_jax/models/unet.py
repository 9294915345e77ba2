"""One configurable text-conditioned U-Net for every cascade stage.

The same module expresses the paper's base U-Net (ADM ordering: residual blocks then downsample, a skip
per block, attention at several levels) and the Efficient U-Net of the super-resolution stages
(`efficient=True`: DBlock = downsample first then blocks, UBlock = blocks then upsample, a skip per level,
more blocks at low resolution). Super-resolution stages add `lowres_cond=True`: the low-resolution image
is upsampled and concatenated to the input and its noise-augmentation level joins the conditioning.

Conditioning: a sinusoidal embedding of the noise level (log-SNR) through an MLP, plus an
attention-pooled text vector; it drives FiLM (scale-shift) in every residual block. Text tokens are
LayerNorm-ed and projected, then read by cross-attention at the levels that ask for it.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from imagen_jax.errors import ConfigError
from imagen_jax.models import layers
from imagen_jax.parallel import axes
from imagen_jax.parallel import mesh as mesh_lib

Dtype = Any


def _per_level(value: Any, num_levels: int, name: str) -> tuple:
    """Expands a scalar to one value per level and checks the length of a sequence."""
    if isinstance(value, (int, float, bool)):
        return (value,) * num_levels
    value = tuple(value)
    if len(value) != num_levels:
        raise ConfigError(
            f"model.{name} has {len(value)} entries but model.channel_mults has {num_levels} levels; "
            "give one value per level (or a single value for all)."
        )
    return value


_PLAIN_BLOCKS = (layers.ResBlock, layers.SelfAttention, layers.CrossAttention)
# Applied, each block is its own nested jit: JAX traces and differentiates one body per distinct block and
# input shape instead of one per block, and XLA inlines the calls, so the compiled program is the same.
# Initialised, the plain blocks: flax's lifted jit draws from other random streams, and a seed keeps its
# weights.
_JITTED_BLOCKS = (
    nn.jit(layers.ResBlock, static_argnums=(3,)),  # `train` (self is argument 0) is a Python bool
    nn.jit(layers.SelfAttention),
    nn.jit(layers.CrossAttention),
)
# What a rematerialised block keeps from its forward pass: names of `jax.checkpoint_policies`.
REMAT_POLICIES = (
    "nothing_saveable",  # recompute everything: the least memory, ~1/3 more FLOPs
    "dots_saveable",  # keep matmul and convolution outputs, recompute the elementwise work (norms, SiLU)
    "dots_with_no_batch_dims_saveable",  # keep dense layers' outputs only (no convolutions, attention maps)
    "everything_saveable",  # keep all: as without remat (for comparisons)
)


@functools.cache
def _block_modules(remat: bool, policy: str, initializing: bool) -> tuple[type[nn.Module], ...]:
    """The residual block, self- and cross-attention modules: plain or jitted, rematerialised or not."""
    blocks = _PLAIN_BLOCKS if initializing else _JITTED_BLOCKS
    if not remat:
        return blocks
    kw = dict(policy=getattr(jax.checkpoint_policies, policy))
    res_block, self_attention, cross_attention = blocks
    return (
        nn.remat(res_block, static_argnums=(3,), **kw),  # `train`, as above
        nn.remat(self_attention, **kw),
        nn.remat(cross_attention, **kw),
    )


# The parts of one level block, in order; a block's parameters are `<block>_<part>` (plain) or
# `<run>/<part>` with a leading axis over the run's blocks (scanned).
BLOCK_PARTS = ("res", "attn", "xattn")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """What one level block computes: an optional skip concatenation, a residual block, then optional
    self- and cross-attention. Hashable, so a scanned module can hold it as a field."""

    width: int
    self_attn: bool
    cross_attn: bool
    heads: int
    head_dim: int
    norm_groups: int
    dropout: float
    attention_impl: str
    learned_null: bool
    skip_scale: float
    remat: bool
    remat_policy: str
    train: bool
    dtype: Any
    param_dtype: Any


def _level_block(
    spec: BlockSpec,
    initializing: bool,
    prefix: str,
    h: jax.Array,
    skip: jax.Array | None,
    cond: jax.Array,
    tokens: jax.Array,
    text_mask: jax.Array,
) -> jax.Array:
    """One level block, its parts named `<prefix><part>` in the module whose method calls this
    (`initializing`: that module's `is_initializing()`)."""
    kw = dict(dtype=spec.dtype, param_dtype=spec.param_dtype)
    res_block, self_attention, cross_attention = _block_modules(spec.remat, spec.remat_policy, initializing)
    if skip is not None:
        h = mesh_lib.constrain_batch(jnp.concatenate([h, skip * spec.skip_scale], axis=-1))
    h = res_block(spec.width, spec.norm_groups, spec.dropout, name=f"{prefix}res", **kw)(h, cond, spec.train)
    if spec.self_attn:
        h = self_attention(
            spec.heads, spec.head_dim, spec.norm_groups, spec.attention_impl, name=f"{prefix}attn", **kw
        )(h)
    if spec.cross_attn:
        h = cross_attention(spec.heads, spec.head_dim, spec.learned_null, name=f"{prefix}xattn", **kw)(
            h, tokens, text_mask
        )
    return mesh_lib.constrain_batch(h)


class _ScannedBlock(nn.Module):
    """The body of a scan over identical level blocks: carries the image features, reads one skip per
    block (up path) and emits each block's output (the down path's skips)."""

    spec: BlockSpec

    @nn.compact
    def __call__(
        self, h: jax.Array, skip: jax.Array | None, cond: jax.Array, tokens: jax.Array, text_mask: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        h = _level_block(self.spec, self.is_initializing(), "", h, skip, cond, tokens, text_mask)
        return h, h


@dataclasses.dataclass(frozen=True)
class BlockRun:
    """Consecutive blocks of one level with identical input shapes: one `nn.scan` when the U-Net is
    scanned (`count` > 1), so the compiled program holds the block once."""

    path: str  # "down" or "up"
    level: int
    first: int  # index of the first block within the level
    count: int

    def block_names(self) -> list[str]:
        return [f"{self.path}{self.level}_{i}" for i in range(self.first, self.first + self.count)]

    @property
    def scan_name(self) -> str:
        return f"{self.path}{self.level}_{self.first}to{self.first + self.count - 1}"


def _runs(path: str, level: int, input_shapes: Sequence[Any]) -> list[BlockRun]:
    """Groups a level's blocks into runs of equal input shapes."""
    runs: list[BlockRun] = []
    for i, shape in enumerate(input_shapes):
        if i and shape == input_shapes[i - 1]:
            runs[-1] = dataclasses.replace(runs[-1], count=runs[-1].count + 1)
        else:
            runs.append(BlockRun(path, level, i, 1))
    return runs


_NULL_TEXTS = ("zero", "learned")
_POSITIVE_INTS = ("channels", "cond_dim", "text_dim", "out_channels", "patch_size", "norm_groups")


def check_channel_mults(mults: Sequence[int]) -> tuple[int, ...]:
    """`model.channel_mults` as a tuple, if it is a non-empty sequence of ints >= 1 (one per level)."""
    values = tuple(mults) if isinstance(mults, (tuple, list)) else ()
    if not values or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in values):
        raise ConfigError(
            f"model.channel_mults={mults!r} must be a non-empty tuple of ints >= 1, e.g. (1, 2, 4)."
        )
    return values


def _check_fields(unet: UNet) -> None:
    """The U-Net's fields (`config.model`'s keys) as far as they can be checked without tracing: one
    `ConfigError` naming the field and what it must be, instead of a shape error deep inside the trace."""
    for name in _POSITIVE_INTS:
        value = getattr(unet, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"model.{name}={value!r} must be an int >= 1.")
    mults = check_channel_mults(unet.channel_mults)
    for count in _per_level(unet.num_res_blocks, len(mults), "num_res_blocks"):
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ConfigError(
                f"model.num_res_blocks={unet.num_res_blocks!r}: each level's count must be an int >= 0."
            )
    attends = [
        s or c
        for s, c in zip(
            _per_level(unet.self_attention, len(mults), "self_attention"),
            _per_level(unet.cross_attention, len(mults), "cross_attention"),
            strict=True,
        )
    ]
    # The attention layers and the text pooling all take their heads from the same setting.
    widths = [unet.channels * m for m, a in zip(mults, attends, strict=True) if a]
    if unet.num_heads:
        if unet.num_heads < 0 or any(w % unet.num_heads for w in [*widths, unet.text_dim]):
            raise ConfigError(
                f"model.num_heads={unet.num_heads} must divide the width of every level with attention "
                f"{widths} and model.text_dim={unet.text_dim} (or be 0: heads of model.head_dim channels)."
            )
    elif unet.head_dim < 1 or any(w % unet.head_dim for w in [*widths, unet.text_dim]):
        raise ConfigError(
            f"model.head_dim={unet.head_dim} must be >= 1 and divide the width of every level with "
            f"attention {widths} and model.text_dim={unet.text_dim}."
        )
    if not 0.0 <= unet.dropout < 1.0:
        raise ConfigError(f"model.dropout={unet.dropout} must be in [0, 1).")
    if unet.null_text not in _NULL_TEXTS:
        raise ConfigError(f"model.null_text={unet.null_text!r}: use one of {list(_NULL_TEXTS)}.")
    if unet.remat_policy not in REMAT_POLICIES:
        raise ConfigError(f"model.remat_policy={unet.remat_policy!r} is not one of {list(REMAT_POLICIES)}.")
    if not 0.0 < unet.logsnr_min_period < unet.logsnr_max_period:
        raise ConfigError(
            f"model.logsnr_min_period={unet.logsnr_min_period} and logsnr_max_period="
            f"{unet.logsnr_max_period} must satisfy 0 < min < max."
        )
    if unet.lowres_cond:
        try:
            jax.image.ResizeMethod.from_string(unet.lowres_upsample)
        except ValueError:
            raise ConfigError(
                f"model.lowres_upsample={unet.lowres_upsample!r} is not a jax.image.resize method: use "
                "'nearest', 'bilinear', 'bicubic', 'lanczos3' or 'lanczos5'."
            ) from None


class UNet(nn.Module):
    """Predicts the diffusion target (v, eps or x0) from a noisy image, its log-SNR and the text."""

    channels: int = 64
    channel_mults: Sequence[int] = (1, 2, 4)
    num_res_blocks: int | Sequence[int] = 2
    self_attention: bool | Sequence[bool] = (False, False, True)
    cross_attention: bool | Sequence[bool] = (False, True, True)
    head_dim: int = 32
    num_heads: int = 0  # 0: derive as channels // head_dim per level
    cond_dim: int = 256
    text_dim: int = 256  # width text tokens are projected to before cross-attention / pooling
    # Learned absolute positions added to the projected text tokens: cross-attention is order-blind, so
    # word order ("red ... left of ... blue") reaches the U-Net only through the encoder; a weak (small,
    # frozen) encoder needs this to bind words to objects. Off for pretrained T5, as in the paper.
    text_positions: bool = False
    # Where each pixel sits, as Fourier features of its image coordinates projected and added after the
    # stem: convolutions and attention are blind to absolute position (only zero padding hints at it), so
    # "left of" may not say which side is left. On the shapes demo they did not settle which object goes
    # where (docs/shapes_demo.md). Coordinates are of the whole image, so not for crop-trained stages.
    image_positions: bool = False
    norm_groups: int = 32
    dropout: float = 0.0
    null_text: str = "zero"  # unconditional text: "zero" embedding (paper) or a "learned" null token
    efficient: bool = False
    skip_scale: float = 1.0 / math.sqrt(2.0)
    out_channels: int = 3
    patch_size: int = 1  # >1: space-to-depth stem and depth-to-space head (U-Net runs at H/p x W/p)
    lowres_cond: bool = False
    # How the low-res input is resized to the noisy image's size before the two are concatenated: any
    # `jax.image.resize` method ("nearest", "bilinear", "bicubic", "lanczos3", ...).
    lowres_upsample: str = "bicubic"
    # Recompute each residual and attention block in the backward pass instead of keeping its activations
    # (paper-size U-Nets on one accelerator); the base U-Net's step then executes ~18% more FLOPs.
    remat: bool = False
    remat_policy: str = "nothing_saveable"  # with remat: what each block keeps (REMAT_POLICIES)
    # Run each level's consecutive identical blocks as one `nn.scan`, so the compiled program holds each
    # distinct block once (a smaller program, the same function). A scanned run's parameters are stacked
    # along a leading axis; `convert_layout` converts between the two layouts. Off by default: XLA:CPU
    # runs the scanned backward pass far slower (docs/benchmarks.md).
    scan_blocks: bool = False
    # Self-attention kernel: "xla" (any backend) or "cudnn" (fused flash attention: GPU, bf16/fp16 only).
    # Cross-attention over the short text stays on XLA.
    attention_impl: str = "xla"
    logsnr_min_period: float = 0.25  # periods of the log-SNR sinusoidal features, in log-SNR units
    logsnr_max_period: float = 200.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def __post_init__(self) -> None:
        _check_fields(self)  # at construction: a bad value fails before any tracing, naming its field
        super().__post_init__()

    def _learned_null(self) -> bool:
        return self.null_text == "learned"

    def _heads(self, width: int) -> tuple[int, int]:
        if self.num_heads:
            return self.num_heads, width // self.num_heads
        return width // self.head_dim, self.head_dim

    def _conditioning(
        self, logsnr: jax.Array, text: jax.Array, text_mask: jax.Array, aug_logsnr: jax.Array | None
    ) -> tuple[jax.Array, jax.Array]:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        # Text: LayerNorm (T5 outputs are unnormalised and large), project, zero the padding.
        tokens = layers.layer_norm(name="text_norm", param_dtype=self.param_dtype)(text)
        tokens = layers.dense(self.text_dim, name="text_proj", in_axis=axes.EMBED, out_axis=axes.MLP, **kw)(
            tokens.astype(self.dtype)
        )
        if self.text_positions:
            positions = self.param(
                "text_positions",
                nn.with_logical_partitioning(nn.initializers.normal(0.02), (axes.LENGTH, axes.MLP)),
                (tokens.shape[1], self.text_dim),
                self.param_dtype,
            )
            tokens = tokens + positions[None].astype(tokens.dtype)
        tokens = tokens * text_mask[..., None].astype(tokens.dtype)  # padding and the null text stay zero

        def noise_embedding(value: jax.Array, name: str) -> jax.Array:
            feats = layers.sinusoidal_embedding(
                value, self.cond_dim, min_period=self.logsnr_min_period, max_period=self.logsnr_max_period
            )
            h = layers.dense(self.cond_dim, name=f"{name}_mlp1", in_axis=axes.EMBED, out_axis=axes.MLP, **kw)(
                feats
            )
            return layers.dense(
                self.cond_dim, name=f"{name}_mlp2", in_axis=axes.MLP, out_axis=axes.EMBED, **kw
            )(nn.silu(h))

        cond = noise_embedding(logsnr, "time")
        if self.lowres_cond:
            cond = cond + noise_embedding(aug_logsnr, "aug")
        heads, head_dim = self._heads(self.text_dim)
        pooled = layers.AttentionPool(heads, head_dim, self._learned_null(), name="text_pool", **kw)(
            tokens, text_mask
        )
        cond = cond + layers.dense(
            self.cond_dim, name="pooled_proj", in_axis=axes.MLP, out_axis=axes.EMBED, **kw
        )(nn.silu(pooled))
        return cond, tokens

    def _widths(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(per-level widths, per-level block counts)."""
        levels = len(self.channel_mults)
        num_blocks = _per_level(self.num_res_blocks, levels, "num_res_blocks")
        return tuple(self.channels * m for m in self.channel_mults), num_blocks

    def block_runs(self) -> tuple[BlockRun, ...]:
        """The level blocks of the down and up paths grouped into runs of identical blocks, from the
        channel counts alone (the same plan for every image size). A block is identified by the width
        of its input and, on the ADM up path, of the skip it concatenates."""
        widths, num_blocks = self._widths()
        levels = len(widths)
        runs: list[BlockRun] = []
        h = widths[0]  # conv_in
        skips = [] if self.efficient else [h]
        for level in range(levels):
            if self.efficient and level > 0:
                h = widths[level]
            inputs = []
            for _ in range(num_blocks[level]):
                inputs.append(h)
                h = widths[level]
                if not self.efficient:
                    skips.append(h)
            runs += _runs("down", level, inputs)
            if self.efficient or level < levels - 1:
                skips.append(h)  # efficient: the level's output; ADM: the downsampled features
        for level in reversed(range(levels)):
            inputs = []
            if self.efficient:
                h += skips.pop()
                for _ in range(num_blocks[level]):
                    inputs.append(h)
                    h = widths[level]
                h = widths[level - 1] if level > 0 else h
            else:
                for _ in range(num_blocks[level] + 1):
                    inputs.append((h, skips.pop()))
                    h = widths[level]
            runs += _runs("up", level, inputs)
        return tuple(runs)

    def _run_blocks(
        self,
        run: BlockRun,
        spec: BlockSpec,
        h: jax.Array,
        skips: list[jax.Array] | None,
        cond: jax.Array,
        tokens: jax.Array,
        text_mask: jax.Array,
    ) -> tuple[jax.Array, list[jax.Array]]:
        """Runs the blocks of `run` (each reading the next of `skips`, if given): (output, every block's
        output)."""
        if not (self.scan_blocks and run.count > 1):
            outs = []
            initializing = self.is_initializing()
            for i, name in enumerate(run.block_names()):
                skip = skips[i] if skips else None
                h = _level_block(spec, initializing, f"{name}_", h, skip, cond, tokens, text_mask)
                outs.append(h)
            return h, outs
        scan = nn.scan(
            _ScannedBlock,
            variable_axes={"params": 0},
            split_rngs={"params": True, "dropout": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast),
            length=run.count,
            metadata_params={nn.PARTITION_NAME: axes.LAYERS},
        )
        h, outs = scan(spec, name=run.scan_name)(
            h, jnp.stack(skips) if skips else None, cond, tokens, text_mask
        )
        return h, list(outs)

    @nn.compact
    def __call__(
        self,
        z: jax.Array,
        logsnr: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        *,
        lowres: jax.Array | None = None,
        aug_logsnr: jax.Array | None = None,
        train: bool = False,
    ) -> jax.Array:
        """z: [B,H,W,C] noisy image; logsnr: [B]; text: [B,L,D] embeddings; text_mask: [B,L] bool.

        A row whose mask is all False is the unconditional (null-text) case.
        """
        widths, _ = self._widths()
        levels = len(widths)
        self_attn = _per_level(self.self_attention, levels, "self_attention")
        cross_attn = _per_level(self.cross_attention, levels, "cross_attention")
        factor = self.patch_size * 2 ** (levels - 1)
        if z.shape[1] % factor or z.shape[2] % factor:
            raise ValueError(
                f"image size {tuple(z.shape[1:3])} must be divisible by patch_size * 2^(levels-1) = {factor}."
            )
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        cond, tokens = self._conditioning(logsnr, text, text_mask, aug_logsnr)
        # Flattened once here, so that the gradients of every cross-attention layer's key and value
        # projections add up without a reshape each: XLA's simplifier moves such reshapes one op per pass
        # and ran its whole-program passes to their iteration limit on the bf16 U-Nets.
        tokens = tokens.reshape(-1, tokens.shape[-1])
        x = z
        if self.lowres_cond:
            if lowres is None or aug_logsnr is None:
                raise ValueError("this U-Net has lowres_cond=True: pass `lowres` and `aug_logsnr`.")
            up = jax.image.resize(lowres, z.shape[:3] + lowres.shape[3:], method=self.lowres_upsample)
            x = jnp.concatenate([z, up.astype(z.dtype)], axis=-1)
        p = self.patch_size
        if p > 1:
            b, hh, ww, c = x.shape
            x = (
                x.reshape(b, hh // p, p, ww // p, p, c)
                .transpose(0, 1, 3, 2, 4, 5)
                .reshape(b, hh // p, ww // p, -1)
            )
        h = layers.conv(widths[0], name="conv_in", **kw)(x.astype(self.dtype))
        if self.image_positions:
            features = image_coordinate_features(h.shape[1], h.shape[2]).astype(self.dtype)
            h = h + layers.dense(widths[0], name="image_positions", **kw)(features)[None]

        def spec(level: int) -> BlockSpec:
            heads, head_dim = self._heads(widths[level])
            return BlockSpec(
                width=widths[level],
                self_attn=self_attn[level],
                cross_attn=cross_attn[level],
                heads=heads,
                head_dim=head_dim,
                norm_groups=self.norm_groups,
                dropout=self.dropout,
                attention_impl=self.attention_impl,
                learned_null=self._learned_null(),
                skip_scale=self.skip_scale,
                remat=self.remat,
                remat_policy=self.remat_policy,
                train=train,
                **kw,
            )

        runs = self.block_runs()
        level_runs = lambda path, level: [r for r in runs if (r.path, r.level) == (path, level)]  # noqa: E731
        skips = []
        # Down path.
        if not self.efficient:
            skips.append(h)
        for level in range(levels):
            if self.efficient and level > 0:  # DBlock: downsample first
                h = layers.Downsample(widths[level], name=f"down{level}_sample", **kw)(h)
            for run in level_runs("down", level):
                h, outs = self._run_blocks(run, spec(level), h, None, cond, tokens, text_mask)
                if not self.efficient:
                    skips += outs
            if self.efficient:
                skips.append(h)
            elif level < levels - 1:
                h = layers.Downsample(widths[level], name=f"down{level}_sample", **kw)(h)
                skips.append(h)

        # Middle: always attends (lowest resolution is cheap).
        mid = spec(levels - 1)
        h = _level_block(mid, self.is_initializing(), "mid_0_", h, None, cond, tokens, text_mask)
        res_only = dataclasses.replace(mid, self_attn=False, cross_attn=False)
        h = _level_block(res_only, self.is_initializing(), "mid_1_", h, None, cond, tokens, text_mask)

        # Up path.
        for level in reversed(range(levels)):
            if self.efficient:
                h = jnp.concatenate([h, skips.pop() * self.skip_scale], axis=-1)
            for run in level_runs("up", level):
                used = None if self.efficient else [skips.pop() for _ in range(run.count)]
                h, _ = self._run_blocks(run, spec(level), h, used, cond, tokens, text_mask)
            if level > 0:  # UBlock: upsample last
                out_width = widths[level - 1] if self.efficient else widths[level]
                h = layers.Upsample(out_width, name=f"up{level}_sample", **kw)(h)

        h = layers.group_norm(self.norm_groups, name="norm_out", param_dtype=self.param_dtype)(
            h, silu=True, dtype=self.dtype
        )
        out = layers.conv(self.out_channels * p * p, name="conv_out", zero=True, **kw)(h)
        if p > 1:
            b, hh, ww, _ = out.shape
            out = out.reshape(b, hh, ww, p, p, -1).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh * p, ww * p, -1)
        return out.astype(jnp.float32)


COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")


def image_coordinate_features(height: int, width: int, num_frequencies: int = 4) -> jax.Array:
    """[height, width, 2 + 4 * num_frequencies]: each cell centre's (y, x) in [-1, 1], and sin/cos of both
    at periods 2, 1, 1/2, ... (in those units), fine enough to tell neighbouring cells of a 16x16 grid."""
    ys = (jnp.arange(height, dtype=jnp.float32) + 0.5) / height * 2 - 1
    xs = (jnp.arange(width, dtype=jnp.float32) + 0.5) / width * 2 - 1
    coords = jnp.stack(jnp.meshgrid(ys, xs, indexing="ij"), axis=-1)  # [H, W, 2]
    angles = coords[..., None] * (jnp.pi * 2.0 ** jnp.arange(num_frequencies))  # [H, W, 2, F]
    angles = angles.reshape(height, width, -1)
    return jnp.concatenate([coords, jnp.sin(angles), jnp.cos(angles)], axis=-1)


def compute_dtype(name: str, backend: str | None = None) -> str:
    """`config.model.dtype` as run on `backend` (default: this process's): "auto" is float32 on CPU, where
    it measured fastest (README), and bfloat16 on GPU/TPU; parameters stay in `param_dtype` either way."""
    if name == "auto":
        return "float32" if (backend or jax.default_backend()) == "cpu" else "bfloat16"
    return name


def unet_from_config(model_config: ml_collections.ConfigDict) -> UNet:
    """Builds the U-Net from `config.model` (every field of the config maps to one module field)."""
    kwargs = dict(model_config)
    if "dtype" in kwargs:
        kwargs["dtype"] = compute_dtype(kwargs["dtype"])
    for key in ("dtype", "param_dtype"):
        if key in kwargs:
            kwargs[key] = jnp.dtype(kwargs[key])
    for key in ("channel_mults", "num_res_blocks", "self_attention", "cross_attention"):
        if isinstance(kwargs.get(key), list):
            kwargs[key] = tuple(kwargs[key])
    known = set(UNet.__dataclass_fields__) - {"parent", "name"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown config.model keys {unknown}; allowed keys: {sorted(known)}.")
    return UNet(**kwargs)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


def _stacked_blocks(*blocks: Any) -> Any:
    """One run's block parameters stacked along a leading axis; logical boxes gain the `layers` name."""
    if _is_box(blocks[0]):
        values = jnp.stack([b.value for b in blocks])
        return blocks[0].replace(value=values, names=(axes.LAYERS, *blocks[0].names))
    return jnp.stack(blocks)


def _block_of(stacked: Any, i: int) -> Any:
    if _is_box(stacked):
        return stacked.replace(value=stacked.value[i], names=stacked.names[1:])
    return stacked[i]


def convert_layout(params: dict[str, Any], unet: UNet, *, scanned: bool) -> dict[str, Any]:
    """The U-Net's parameters (`{"conv_in": ..., ...}`, arrays or logical boxes) in the scanned layout (each
    run of identical blocks under one name, stacked along a leading `layers` axis) or the unrolled one (one
    entry per block part), from either layout; the values are the same arrays, so both forms compute the
    same function."""
    out = dict(params)
    for run in unet.block_runs():
        if run.count < 2:
            continue
        names = run.block_names()
        if scanned and run.scan_name not in out:
            parts = [part for part in BLOCK_PARTS if f"{names[0]}_{part}" in out]
            out[run.scan_name] = {
                part: jax.tree.map(_stacked_blocks, *[out.pop(f"{n}_{part}") for n in names], is_leaf=_is_box)
                for part in parts
            }
        elif not scanned and run.scan_name in out:
            for part, stacked in out.pop(run.scan_name).items():
                for i, name in enumerate(names):
                    block = jax.tree.map(lambda x, i=i: _block_of(x, i), stacked, is_leaf=_is_box)
                    out[f"{name}_{part}"] = block
    return out
