"""Orbax checkpoints of one cascade stage: the train state plus the config (JSON) it was trained with.

Layout: `<workdir>/checkpoints/<step>/{state,config,data}`; `data` is the input pipeline's iterator
position, so a resumed run continues the exact example stream instead of replaying or skipping data.
Restoring places every array directly with the target sharding (any mesh), and a checkpoint that does not
match the model fails with one message that names the directory and the differing config keys instead
of a deep Orbax/XLA traceback.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from imagen_jax.training.state import TrainState

# Config sections that decide the shapes of the checkpointed arrays.
ARCHITECTURE_KEYS = ("model", "text")


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


def checkpoint_dir(workdir: str) -> str:
    # Orbax needs absolute paths; URLs (gs://...) are absolute already.
    base = workdir if "://" in workdir else os.path.abspath(workdir)
    return os.path.join(base, "checkpoints")


def make_manager(workdir: str, *, keep: int, create: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=create)
    return ocp.CheckpointManager(
        checkpoint_dir(workdir), options=options, item_names=("state", "config", "data")
    )


def save(
    manager: ocp.CheckpointManager,
    state: TrainState,
    config: ml_collections.ConfigDict,
    data_state: bytes | None = None,
) -> None:
    """Saves asynchronously (training continues while the files are written)."""
    step = int(jax.device_get(state.step))
    items = dict(state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(config_to_json_dict(config)))
    if data_state is not None:
        items["data"] = ocp.args.JsonSave({"iterator": data_state.decode()})
    manager.save(step, args=ocp.args.Composite(**items))


def restore_data_state(manager: ocp.CheckpointManager, step: int) -> bytes | None:
    """The input iterator position saved with `step`, or None for checkpoints written without one."""
    try:
        saved = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    except (FileNotFoundError, KeyError, ValueError):
        return None
    return None if saved is None else saved["iterator"].encode()


def read_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
    """The config a checkpoint was trained with (latest step unless given)."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"no checkpoints in {directory!r}: train first "
            f"(python train.py --config ... --workdir {workdir})."
        )
    manager = make_manager(workdir, keep=1_000_000, create=False)
    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{directory!r} holds no finished checkpoint; train first.")
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    return ml_collections.ConfigDict(saved)


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} vs config {current!r}"]


def restore(
    manager: ocp.CheckpointManager,
    abstract_state: TrainState,
    config: ml_collections.ConfigDict,
    step: int | None = None,
) -> TrainState:
    """Restores `step` (default latest) onto the shardings held by `abstract_state` (ShapeDtypeStructs)."""
    step = manager.latest_step() if step is None else step
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    current = config_to_json_dict(config)
    diffs = [d for key in ARCHITECTURE_KEYS for d in _differences(saved.get(key), current.get(key), key)]
    if diffs:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} was trained with a different architecture:\n  "
            + "\n  ".join(diffs)
            + "\nUse the checkpoint's config (sample.py reads it from the workdir) or a new --workdir."
        )
    try:
        restored = manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        )
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(
            f"checkpoint {manager.directory}/{step} does not match the model ({type(err).__name__}: "
            f"{str(err)[:500]}). Train a new run in a fresh --workdir or restore with the checkpoint's "
            "config."
        ) from err
    return restored["state"]
