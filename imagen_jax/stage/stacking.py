"""Weights held stacked by shape (`optim.stack_by_shape`): one array per group of same-shaped parameters.

Why: XLA compiles the work done per parameter (the optimizer's update, the EMA, the clipping's norms) as
separate kernels for each parameter, and for the paper's base U-Net that work is most of the train step's
kernels (docs/benchmarks.md). A train state whose weights, EMA and optimizer state are stacked by shape
runs it once per group. The model still reads one array per parameter: the train step splits the stacks
(`unstacked`) and stacks the gradients again (`restacked`, one concatenation per group).

In the train step each member of a group is read at a position that is an input of the program
(`positions`), not a constant. XLA fuses a read into the kernels that use it (a GroupNorm's scale, a
weight's bf16 copy); a constant index would make those kernels differ from one member of a group to the
next, and XLA compiles each distinct kernel: for the paper's base U-Net, 1,972 in the gradient program
against 1,159 with the positions as inputs (docs/benchmarks.md).

Groups are leaves with the same shape, dtype and logical axis names, so a stack is sharded like each of
its parameters, with the new leading axis unsplit: stacking moves no data between devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from imagen_jax.parallel import axes


def enabled(config: Any) -> bool:
    """Whether `config` (a stage config or its JSON dict) holds the train state stacked by shape."""
    return bool(config.get("optim", {}).get("stack_by_shape", False))


def is_box(x: Any) -> bool:
    return isinstance(x, nn.Partitioned)


@flax.struct.dataclass
class Stacked:
    """A tree of parameters as one array per group of its leaves, stacked along a new first axis; a leaf
    without a twin is kept as it is. `groups[i]` lists the flat indices of the leaves in `stacks[i]`;
    groups and the tree's structure are static, so a checkpoint restores into the grouping its abstract
    state was built with."""

    stacks: tuple[Any, ...]
    groups: tuple[tuple[int, ...], ...] = flax.struct.field(pytree_node=False)
    treedef: Any = flax.struct.field(pytree_node=False)

    @property
    def largest_group(self) -> int:
        return max(map(len, self.groups), default=0)

    def unstack(self, positions: Sequence[jax.Array] | None = None) -> Any:
        """The tree of parameters, each its own array again; member k of a group read at `positions[k]`
        (int32 scalars holding k, see `positions`) or, without them, at the constant k."""
        largest = self.largest_group
        if positions is not None and largest > 1 and len(positions) < largest:
            raise ValueError(
                f"{len(positions)} positions for a group of {largest} stacked parameters: make them with "
                "`stacking.positions` from this same tree."
            )
        leaves: list[Any] = [None] * sum(map(len, self.groups))
        for group, stack in zip(self.groups, self.stacks, strict=True):
            if len(group) == 1:
                leaves[group[0]] = stack
                continue
            for k, i in enumerate(group):
                at = k if positions is None else positions[k]
                leaves[i] = jax.lax.dynamic_index_in_dim(stack, at, keepdims=False)
        return jax.tree.unflatten(self.treedef, leaves)

    def restack(self, tree: Any) -> Stacked:
        """`tree`, shaped like the unstacked parameters (their gradients, say), stacked as these are."""
        leaves = self.treedef.flatten_up_to(tree)
        stacks = tuple(
            leaves[g[0]] if len(g) == 1 else jnp.stack([leaves[i] for i in g]) for g in self.groups
        )
        return self.replace(stacks=stacks)


def _shape_groups(leaves: list[Any]) -> tuple[tuple[int, ...], ...]:
    """Flat indices grouped by shape, dtype and logical names (for boxed leaves), in order of first
    appearance."""
    groups: dict[Any, list[int]] = {}
    for i, leaf in enumerate(leaves):
        value, names = (leaf.value, leaf.names) if is_box(leaf) else (leaf, None)
        groups.setdefault((tuple(value.shape), jnp.dtype(value.dtype), names), []).append(i)
    return tuple(tuple(g) for g in groups.values())


def _stack(leaves: list[Any]) -> Any:
    """The leaves stacked along a new first axis; boxes keep their names, the new axis unnamed."""
    if is_box(leaves[0]):
        values = jnp.stack([leaf.value for leaf in leaves])
        return leaves[0].replace(value=values, names=(None, *leaves[0].names))
    return jnp.stack(leaves)


def stack(tree: Any) -> Stacked:
    """`tree`'s leaves (arrays or logical boxes) stacked by shape."""
    leaves, treedef = jax.tree.flatten(tree, is_leaf=is_box)
    groups = _shape_groups(leaves)
    stacks = tuple(leaves[g[0]] if len(g) == 1 else _stack([leaves[i] for i in g]) for g in groups)
    return Stacked(stacks=stacks, groups=groups, treedef=treedef)


def stack_parts(params: dict[str, Any]) -> dict[str, Stacked]:
    """Each part of a stage's weights ({"unet": ..., "text": ...}) stacked on its own, so the parts keep
    their names."""
    return {name: stack(part) for name, part in params.items()}


def _is_stacked(x: Any) -> bool:
    return isinstance(x, Stacked)


def unstacked(tree: Any, positions: Sequence[jax.Array] | None = None) -> Any:
    """`tree` with every `Stacked` in it unstacked (a tree without one is returned as it is); `positions`
    as in `Stacked.unstack`."""
    return jax.tree.map(lambda x: x.unstack(positions) if _is_stacked(x) else x, tree, is_leaf=_is_stacked)


def restacked(tree: Any, like: Any) -> Any:
    """`tree`, shaped like `unstacked(like)`, with each part stacked as `like`'s is: the gradient of
    `unstacked` (the transpose of reading the members of a group is their concatenation)."""
    return jax.tree.map(lambda x, t: x.restack(t) if _is_stacked(x) else t, like, tree, is_leaf=_is_stacked)


def positions(tree: Any, sharding: jax.sharding.Sharding) -> tuple[jax.Array, ...]:
    """int32 scalars 0, 1, ... up to the largest group of the `Stacked` parts of `tree` (arrays or shapes),
    placed with `sharding` (replicated): passed into the train step as `unstacked`'s `positions`, so the
    compiler cannot see which member of a group a kernel reads. Empty when nothing is stacked."""
    stacked = jax.tree.leaves(tree, is_leaf=_is_stacked)
    largest = max((x.largest_group for x in stacked if _is_stacked(x)), default=0)
    return tuple(jax.device_put(np.int32(k), sharding) for k in range(largest if largest > 1 else 0))


def _layers_axis(leaf: Any, at: int) -> int:
    """1 if axis `at` of the (boxed) leaf is a scanned run's `layers` axis, else 0."""
    names = leaf.names if is_box(leaf) else ()
    return int(len(names) > at and names[at] == axes.LAYERS)


def stacked_axes(tree: Any) -> list[int]:
    """For each leaf of `tree` in flattening order (a box counts as one leaf): how many of its leading axes
    stack several parameters. A group of `Stacked` adds one; a scanned run's parameters (their first
    logical name is `layers`) add one more. Scanned parameters are known only by that name, so `tree`
    must be boxed for them to count."""
    counts: list[int] = []
    for node in jax.tree.leaves(tree, is_leaf=lambda x: isinstance(x, Stacked) or is_box(x)):
        if not isinstance(node, Stacked):
            counts.append(_layers_axis(node, 0))
            continue
        for group, leaf in zip(node.groups, node.stacks, strict=True):
            grouped = int(len(group) > 1)
            counts.append(grouped + _layers_axis(leaf, grouped))
    return counts
