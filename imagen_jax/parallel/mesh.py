"""The device mesh and the logical-axis rules that map model dimensions onto it, defined once.

Model code annotates parameters with logical names (`imagen_jax.parallel.axes`). A config chooses:
- `mesh`: sizes of the mesh axes `data`, `fsdp` and `tensor` (-1 = the remaining devices). Within a slice
  the devices are laid out by `jax.experimental.mesh_utils`, so the last axes (tensor, then fsdp) get the
  fastest links; `mesh_dcn` gives the axes' sizes across slices (multi-slice TPU: a hybrid ICI x DCN mesh).
- `sharding.preset`: one word naming a rule table (`PRESETS`): `dp` (parameters replicated), `fsdp`
  (parameters, EMA and optimizer state split over `fsdp`), `fsdp_tp` (also split over `tensor`, Megatron
  style: the wide dimension of each kernel over `tensor`, the other over `fsdp`). The batch is split over
  `data` x `fsdp` in every preset. `sharding.rules` overrides single rules, e.g. (('mlp', None),);
  `sharding.min_shard_size` keeps arrays with fewer elements (norm scales, biases) replicated.

Rules are tried in order for each array, the first whose mesh axes are still free in that array and
divide its dimension wins (flax's priority order, plus the divisibility check a kernel with, e.g., 3
output channels needs); dimensions no rule places are replicated.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax.errors import ConfigError
from imagen_jax.parallel import axes

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_MESH_AXES = ("data", "fsdp")

Rule = tuple[str, Any]  # (logical name, mesh axis, tuple of mesh axes, or None)

_REPLICATED: tuple[Rule, ...] = tuple(
    (name, None)
    for name in (
        axes.LENGTH,
        axes.EMBED,
        axes.MLP,
        axes.HEADS,
        axes.KV,
        axes.VOCAB,
        axes.CONV_IN,
        axes.CONV_OUT,
        axes.NORM,
        axes.REL_BUCKETS,
        axes.LAYERS,
    )
)

# Each parameter's widest dimension comes first, so it is the one split when it divides.
PRESETS: dict[str, tuple[Rule, ...]] = {
    "dp": ((axes.BATCH, BATCH_MESH_AXES), *_REPLICATED),
    "fsdp": (
        (axes.BATCH, BATCH_MESH_AXES),
        (axes.CONV_OUT, "fsdp"),
        (axes.MLP, "fsdp"),
        (axes.HEADS, "fsdp"),
        (axes.VOCAB, "fsdp"),
        (axes.EMBED, "fsdp"),
        (axes.CONV_IN, "fsdp"),
        (axes.KV, "fsdp"),
        *_REPLICATED,
    ),
    "fsdp_tp": (
        (axes.BATCH, BATCH_MESH_AXES),
        (axes.CONV_OUT, "tensor"),
        (axes.MLP, "tensor"),
        (axes.HEADS, "tensor"),
        (axes.VOCAB, "tensor"),
        (axes.EMBED, "fsdp"),
        (axes.CONV_IN, "fsdp"),
        # Fallbacks when the first choice does not divide or its axis is taken.
        (axes.CONV_OUT, "fsdp"),
        (axes.MLP, "fsdp"),
        (axes.HEADS, "fsdp"),
        (axes.KV, "fsdp"),
        (axes.EMBED, "tensor"),
        (axes.CONV_IN, "tensor"),
        *_REPLICATED,
    ),
}
# Norm scales and biases (at most a few thousand elements) are not worth a collective each.
DEFAULT_MIN_SHARD_SIZE = 2**14


@dataclasses.dataclass(frozen=True)
class AxisRules:
    """A rule table in priority order, and the size below which arrays stay replicated."""

    table: tuple[Rule, ...]
    min_shard_size: int = 0


def _normalise(table: Sequence[Sequence[Any]]) -> tuple[Rule, ...]:
    """Rules from a config or a checkpoint's JSON (lists) as hashable tuples."""
    out = []
    for name, target in table:
        if isinstance(target, (list, tuple)):
            target = tuple(str(t) for t in target)
        out.append((str(name), target))
    return tuple(out)


def preset_rules(preset: str, overrides: Sequence[Sequence[Any]] = ()) -> tuple[Rule, ...]:
    """The rule table of `preset` with `overrides` replacing every preset rule of their logical names."""
    if preset not in PRESETS:
        raise ConfigError(f"config.sharding.preset={preset!r}: use one of {sorted(PRESETS)}.")
    overrides = _normalise(overrides)
    replaced = {name for name, _ in overrides}
    return overrides + tuple(rule for rule in PRESETS[preset] if rule[0] not in replaced)


RulesLike = AxisRules | Mapping[str, Any] | Sequence[Sequence[Any]] | None


def axis_rules(spec: RulesLike) -> AxisRules:
    """`AxisRules` from `config.sharding` (preset, rules, min_shard_size), a plain rule table, or None
    (the `dp` preset)."""
    if spec is None:
        return AxisRules(PRESETS["dp"])
    if isinstance(spec, AxisRules):
        return spec
    if isinstance(spec, Mapping) or hasattr(spec, "preset"):
        return AxisRules(
            preset_rules(spec["preset"], spec.get("rules", ()) or ()),
            int(spec.get("min_shard_size", DEFAULT_MIN_SHARD_SIZE)),
        )
    return AxisRules(_normalise(spec))


def _mesh_shape(
    mesh_axes: Sequence[Sequence[Any]], num_devices: int, what: str = "config.mesh"
) -> tuple[tuple[str, ...], list[int]]:
    names = [str(name) for name, _ in mesh_axes]
    sizes = [int(size) for _, size in mesh_axes]
    if len(set(names)) != len(names):
        raise ConfigError(f"{what} {list(mesh_axes)} names an axis twice.")
    if sizes.count(-1) > 1:
        raise ConfigError(f"{what} {list(mesh_axes)}: at most one axis may have size -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % known:
            raise ConfigError(
                f"{what} {list(mesh_axes)}: {num_devices} devices are not divisible by the fixed axis "
                f"sizes (product {known}). Change the sizes so their product divides {num_devices}."
            )
        sizes[sizes.index(-1)] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ConfigError(
            f"{what} {list(mesh_axes)} needs {math.prod(sizes)} devices but {num_devices} are "
            "available. Use -1 for one axis to fill the remaining devices."
        )
    return tuple(names), sizes


def make_mesh(
    mesh_axes: Sequence[Sequence[Any]],
    devices: Sequence[Any] | None = None,
    dcn: Sequence[Sequence[Any]] = (),
) -> Mesh:
    """A mesh from [(axis_name, size), ...] (one size may be -1: the remaining devices).

    With `dcn` [(axis_name, slices), ...] (multi-slice TPU), `mesh_axes` sizes are per slice and the
    mesh is ICI x DCN (`mesh_utils.create_hybrid_device_mesh`): an axis spans slices only as `dcn` says.
    """
    devices = list(jax.devices() if devices is None else devices)
    dcn_sizes = dict((str(name), int(size)) for name, size in dcn)
    slices = math.prod(dcn_sizes.values())
    if len(devices) % slices:
        raise ConfigError(
            f"config.mesh_dcn {list(dcn)}: {len(devices)} devices do not split into {slices} slices."
        )
    names, sizes = _mesh_shape(mesh_axes, len(devices) // slices)
    unknown = set(dcn_sizes) - set(names)
    if unknown:
        raise ConfigError(f"config.mesh_dcn names {sorted(unknown)}, which config.mesh {list(names)} lacks.")
    if dcn_sizes:
        dcn_shape = [dcn_sizes.get(name, 1) for name in names]
        grid = mesh_utils.create_hybrid_device_mesh(sizes, dcn_shape, devices)
    elif devices[0].platform in ("tpu", "gpu", "cuda", "rocm"):
        grid = mesh_utils.create_device_mesh(sizes, devices, allow_split_physical_axes=True)
    else:  # CPU devices have no topology to follow
        grid = np.asarray(devices).reshape(sizes)
    return Mesh(grid, names)


def _mesh_axes_of(target: Any) -> tuple[str, ...]:
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def partition_spec(
    logical_axes: Sequence[str | None], mesh: Mesh, rules: RulesLike, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """The PartitionSpec of an array whose dimensions carry `logical_axes`. With `shape`, a rule only
    applies where its mesh axes divide the dimension, and arrays under the size threshold stay
    replicated (parameters and state); without, dimensions are placed as the rules say (activations)."""
    rules = axis_rules(rules)
    if shape is not None and math.prod(shape) < rules.min_shard_size:
        return PartitionSpec()
    result: list[Any] = [None] * len(logical_axes)
    placed = [False] * len(logical_axes)
    used: set[str] = set()
    for name, target in rules.table:
        if name not in logical_axes:
            continue
        pos = logical_axes.index(name)
        mesh_axes = tuple(a for a in _mesh_axes_of(target) if a in mesh.shape)
        if placed[pos] or used & set(mesh_axes):
            continue
        if shape is not None and shape[pos] % math.prod(mesh.shape[a] for a in mesh_axes):
            continue
        placed[pos] = True
        used |= set(mesh_axes)
        if mesh_axes:
            result[pos] = mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes
    return PartitionSpec(*result) if any(result) else PartitionSpec()


def logical_sharding(
    logical_axes: Sequence[str | None], mesh: Mesh, rules: RulesLike, shape: Sequence[int] | None = None
) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry the given logical names (see
    `partition_spec`)."""
    return NamedSharding(mesh, partition_spec(logical_axes, mesh, rules, shape))


_ACTIVATIONS: contextvars.ContextVar[tuple[Mesh, AxisRules] | None] = contextvars.ContextVar(
    "imagen_jax_activation_mesh", default=None
)


@contextlib.contextmanager
def activation_rules(mesh: Mesh, rules: RulesLike) -> Iterator[None]:
    """While a program is traced inside, `constrain_batch` in model code places activations on `mesh`."""
    token = _ACTIVATIONS.set((mesh, axis_rules(rules)))
    try:
        yield
    finally:
        _ACTIVATIONS.reset(token)


def constrain_batch(x: jax.Array) -> jax.Array:
    """`x` split over the batch mesh axes, other dimensions whole, inside `activation_rules` (a hint
    for the SPMD partitioner, which otherwise may gather a whole batch to split channels); unchanged
    outside."""
    context = _ACTIVATIONS.get()
    if context is None:
        return x
    mesh, rules = context
    return jax.lax.with_sharding_constraint(x, batch_sharding(mesh, rules, x.ndim))


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: RulesLike) -> Any:
    """Shardings for a tree that may hold `nn.LogicallyPartitioned` boxes (from `jax.eval_shape(init)`).

    Unannotated leaves are replicated, and so are boxes whose names do not fit their rank: optax passes a
    parameter's box on to state derived from it, and Adafactor's factored moments (a parameter's row and
    column statistics) have fewer dimensions than the names describe; they are small. The returned tree
    has the boxes removed (same structure as `nn.unbox(tree)`), ready for `jax.jit(..., out_shardings=...)`.
    """
    rules = axis_rules(rules)

    def sharding(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.Partitioned) and len(leaf.names) == len(leaf.value.shape):
            if isinstance(leaf, nn.LogicallyPartitioned):
                return logical_sharding(leaf.names, mesh, rules, leaf.value.shape)
            return NamedSharding(mesh, PartitionSpec(*leaf.names))  # names are already mesh axes
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, rules: RulesLike, ndim: int) -> NamedSharding:
    """Sharding of a batch array: first dimension over the batch mesh axes, the rest replicated."""
    return logical_sharding((axes.BATCH,) + (None,) * (ndim - 1), mesh, rules)


def _batch_axes(mesh: Mesh, rules: RulesLike) -> tuple[str, ...]:
    spec = partition_spec((axes.BATCH,), mesh, rules)[0]
    return _mesh_axes_of(spec)


def batch_shards(mesh: Mesh, rules: RulesLike) -> int:
    """How many ways the batch is split: the product of the mesh axes the batch axis maps to."""
    return math.prod(mesh.shape[name] for name in _batch_axes(mesh, rules))


def check_batch_divisible(
    global_batch: int, mesh: Mesh, rules: RulesLike, what: str = "config.train.batch_size"
) -> None:
    """Raises a clear error when the global batch does not split evenly over the batch mesh axes."""
    names = _batch_axes(mesh, rules)
    shards = batch_shards(mesh, rules)
    if global_batch % shards:
        raise ConfigError(
            f"batch size {global_batch} does not divide over the {shards} devices of mesh axes {names} "
            f"(mesh {dict(mesh.shape)}). Set {what} to a multiple of {shards}."
        )
