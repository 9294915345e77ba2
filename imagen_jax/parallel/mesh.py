"""The device mesh and the one table that maps logical axis names to mesh axes.

Model code annotates parameters with logical names (`imagen_jax.parallel.axes`); the config holds
`mesh` (mesh axis names and sizes, -1 = fill with the remaining devices) and `axis_rules` (logical name ->
mesh axis or None), both tuples of pairs so that the command line can override them. Everything that
places arrays on devices goes through the functions here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from imagen_jax.errors import ConfigError
from imagen_jax.parallel import axes

# (logical name, mesh axis or None). The data-parallel default: batch over `data`, parameters replicated.
# FSDP maps e.g. EMBED / CONV_OUT to "fsdp" (a later config change, no model change).
DEFAULT_AXIS_RULES: tuple[tuple[str, str | None], ...] = (
    (axes.BATCH, "data"),
    (axes.LENGTH, None),
    (axes.EMBED, None),
    (axes.MLP, None),
    (axes.HEADS, None),
    (axes.KV, None),
    (axes.VOCAB, None),
    (axes.CONV_IN, None),
    (axes.CONV_OUT, None),
    (axes.NORM, None),
    (axes.REL_BUCKETS, None),
    (axes.LAYERS, None),
)


def make_mesh(mesh_axes: Sequence[tuple[str, int]], devices: Sequence[Any] | None = None) -> Mesh:
    """Builds a mesh from [(axis_name, size), ...]; one size may be -1 (use the remaining devices)."""
    devices = list(jax.devices() if devices is None else devices)
    names = [name for name, _ in mesh_axes]
    sizes = [int(size) for _, size in mesh_axes]
    if sizes.count(-1) > 1:
        raise ConfigError(f"config.mesh {list(mesh_axes)}: at most one axis may have size -1.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ConfigError(
                f"config.mesh {list(mesh_axes)}: {len(devices)} devices are not divisible by the fixed axis "
                f"sizes (product {known}). Change the sizes so their product divides {len(devices)}."
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ConfigError(
            f"config.mesh {list(mesh_axes)} needs {math.prod(sizes)} devices but {len(devices)} are "
            "available. Use -1 for one axis to fill the remaining devices."
        )
    return Mesh(np.asarray(devices).reshape(sizes), tuple(names))


def axis_rules(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, str | None], ...]:
    """Normalises config rules (tuples, or lists from a checkpoint's JSON config) to the form flax expects."""
    if rules is None:
        return DEFAULT_AXIS_RULES
    return tuple((str(name), None if target is None else target) for name, target in rules)


def logical_sharding(
    logical_axes: Sequence[str | None], mesh: Mesh, rules: Sequence[Sequence[Any]] | None
) -> NamedSharding:
    """The NamedSharding of an array whose dimensions carry the given logical names."""
    spec = nn.logical_to_mesh_axes(tuple(logical_axes), axis_rules(rules))
    return NamedSharding(mesh, spec)


def tree_shardings(abstract_tree: Any, mesh: Mesh, rules: Sequence[Sequence[Any]] | None) -> Any:
    """Shardings for a tree that may hold `nn.LogicallyPartitioned` boxes (from `jax.eval_shape(init)`).

    Unannotated leaves are replicated, and so are boxes whose names do not fit their rank: optax passes a
    parameter's box on to state derived from it, and Adafactor's factored moments (a parameter's row and
    column statistics) have fewer dimensions than the names describe; they are small. The returned tree
    has the boxes removed (same structure as `nn.unbox(tree)`), ready for `jax.jit(..., out_shardings=...)`.
    """

    def sharding(leaf: Any) -> NamedSharding:
        if isinstance(leaf, nn.Partitioned) and len(leaf.names) == len(leaf.value.shape):
            if isinstance(leaf, nn.LogicallyPartitioned):
                return logical_sharding(leaf.names, mesh, rules)
            return NamedSharding(mesh, PartitionSpec(*leaf.names))  # names are already mesh axes
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(sharding, abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def batch_sharding(mesh: Mesh, rules: Sequence[Sequence[Any]] | None, ndim: int) -> NamedSharding:
    """Sharding of a batch array: first dimension over the batch mesh axis, the rest replicated."""
    return logical_sharding((axes.BATCH,) + (None,) * (ndim - 1), mesh, rules)


def _batch_axes(rules: Sequence[Sequence[Any]] | None) -> tuple[str, ...]:
    spec = nn.logical_to_mesh_axes((axes.BATCH,), axis_rules(rules))[0]
    return () if spec is None else (spec if isinstance(spec, tuple) else (spec,))


def batch_shards(mesh: Mesh, rules: Sequence[Sequence[Any]] | None) -> int:
    """How many ways the batch is split: the product of the mesh axes the batch axis maps to."""
    return math.prod(mesh.shape[name] for name in _batch_axes(rules))


def check_batch_divisible(global_batch: int, mesh: Mesh, rules: Sequence[Sequence[Any]] | None) -> None:
    """Raises a clear error when the global batch does not split evenly over the batch mesh axes."""
    names = _batch_axes(rules)
    shards = batch_shards(mesh, rules)
    if global_batch % shards:
        raise ConfigError(
            f"batch size {global_batch} does not divide over the {shards} devices of mesh axes {names} "
            f"(mesh {dict(mesh.shape)}). Set config.train.batch_size to a multiple of {shards}."
        )
