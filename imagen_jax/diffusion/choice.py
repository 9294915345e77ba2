"""Named options (sampler, time grid, thresholding) chosen while tracing or at run time.

A name picks its branch while tracing, so the program holds that branch alone. An int32 index into the
option's names (`index_of`) picks it at run time, so one compiled program serves every value: a sampling
program that takes its sampler, step count and thresholding as inputs compiles once per batch shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Choice = str | jax.Array


def check_name(name: str, allowed: Sequence[str], what: str) -> int:
    """The position of `name` in `allowed`; a ValueError naming the allowed values otherwise."""
    if name not in allowed:
        raise ValueError(f"Unknown {what} {name!r}; allowed: {', '.join(allowed)}")
    return list(allowed).index(name)


def index_of(name: str, allowed: Sequence[str], what: str) -> jax.Array:
    """`name` as the int32 index a program takes to choose at run time."""
    return jnp.int32(check_name(name, allowed, what))


def equals(choice: Choice, name: str, allowed: Sequence[str]) -> bool | jax.Array:
    """Whether `choice` is `name`: a Python bool for a name, a traced one for a run-time index (to select
    between cheap values without a conditional)."""
    if isinstance(choice, str):
        return choice == name
    return choice == list(allowed).index(name)


def switch(
    choice: Choice, allowed: Sequence[str], what: str, branches: Sequence[Callable[..., Any]], *operands: Any
) -> Any:
    """branches[i](*operands) for the option allowed[i] that `choice` names or indexes; at run time a
    conditional, so the branches not chosen do not run."""
    if isinstance(choice, str):
        return branches[check_name(choice, allowed, what)](*operands)
    return jax.lax.switch(choice, branches, *operands)
