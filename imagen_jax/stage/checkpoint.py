"""Orbax checkpoints of one cascade stage that are never lost and never silently wrong.

Layout: `<workdir>/checkpoints/<step>/{params,ema_params,train,config,data,integrity}` plus
`files.process_<i>.json`. The array items are the trained weights, their EMA (all that sampling reads) and
the rest of the train state (step, optimizer, PRNG key); `data` is the input pipeline's iterator position
(a resumed run continues the exact example stream), `integrity` the content digests of every array of
every item (`integrity.digest_tree`), and the `files.*` manifests the sizes and SHA-256 of the files as
written. Writing (`CheckpointWriter`):
- refuses arrays holding NaN/inf, naming them and the last good step;
- saves asynchronously (Orbax), then hashes the finished files in a background thread;
- prunes to `keep` checkpoints itself, never deleting the newest read-back (manifested) checkpoint while
  a newer one is not yet read back.
Reading (`restore_newest_good`) checks the manifests, loads the requested items directly with the target
sharding (any mesh), then compares their digests before anything uses them; a damaged checkpoint is
named with its cause in one line and the previous one is tried. A checkpoint of another architecture is
refused with the differing config keys, and before any array is read, with the arrays whose stored shapes
differ from those asked for (a hand-edited config, or a caller asking for another model's structures).
The workdir may be local or a URL Orbax and `etils.epath` can reach (`gs://bucket/run`): every file
operation here goes through `epath.Path`.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from imagen_jax.errors import (
    CheckpointDamagedError,
    CheckpointError,
    CheckpointNotFoundError,
    NonFiniteError,
)
from imagen_jax.parallel import distributed
from imagen_jax.stage import integrity, stacking

log = logging.getLogger("imagen_jax")

# Config sections that decide the shapes of the checkpointed arrays.
ARCHITECTURE_KEYS = ("model", "text")
# Model keys that change how the step computes, not what it stores: a run may resume with other values.
RUNTIME_MODEL_KEYS = ("remat", "remat_policy", "attention_impl", "dtype")
ARRAY_ITEMS = ("params", "ema_params", "train")
ITEMS = (*ARRAY_ITEMS, "config", "data", "integrity")
_TENSORSTORE_STATUSES = ("DATA_LOSS", "OUT_OF_RANGE", "NOT_FOUND", "FAILED_PRECONDITION", "INVALID_ARGUMENT")


def config_to_json_dict(config: ml_collections.ConfigDict) -> dict:
    return json.loads(config.to_json_best_effort())


PathLike = str | os.PathLike  # a local path, or a URL as str or `epath.Path` ('gs://bucket/run')


def _base(workdir: PathLike) -> epath.Path:
    # Orbax needs absolute paths; URLs (gs://...) are absolute already. Local ones are normalised as
    # os.path.abspath does (pathlib's absolute() keeps '..').
    workdir = os.fspath(workdir)
    return epath.Path(workdir if "://" in workdir else os.path.abspath(workdir))


def checkpoint_dir(workdir: PathLike) -> str:
    return str(_base(workdir) / "checkpoints")


def damaged_dir(workdir: PathLike) -> str:
    """Where training moves checkpoints that failed verification: kept for inspection, out of the way."""
    return str(_base(workdir) / "checkpoints_damaged")


# Orbax saves an array replicated over R devices as R slices, one per replica, each cut by its own eager
# dispatch on the host before the save returns. Below this size per slice the cuts cost more than the
# parallel writes save (docs/robustness.md); larger arrays are still written in parallel slices.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _use_array_handler() -> None:
    """Registers Orbax's array handler with `MIN_REPLICA_SLICE_BYTES` (process-wide: Orbax's `StandardSave`
    takes its handlers only from its global registry). It keeps the default handler's array metadata
    store, so the same files are written."""
    current = ocp.type_handlers.get_type_handler(jax.Array)
    if getattr(current, "_min_slice_bytes_for_replica_parallel", None) == MIN_REPLICA_SLICE_BYTES:
        return
    handler = ocp.type_handlers.ArrayHandler(
        array_metadata_store=current._array_metadata_store,
        min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
    )
    ocp.type_handlers.register_type_handler(jax.Array, handler, override=True)


def make_manager(workdir: PathLike, *, create: bool = True) -> ocp.CheckpointManager:
    # No max_to_keep: `CheckpointWriter` prunes, so that retention can wait for read-back verification.
    options = ocp.CheckpointManagerOptions(create=create)
    _use_array_handler()
    return ocp.CheckpointManager(checkpoint_dir(workdir), options=options, item_names=ITEMS)


def has_checkpoints(workdir: PathLike) -> bool:
    """Whether `workdir` holds any finished checkpoint (good or damaged)."""
    if not epath.Path(checkpoint_dir(workdir)).is_dir():
        return False
    return bool(make_manager(workdir, create=False).all_steps())


def _step_dir(manager: ocp.CheckpointManager, step: int) -> str:
    return str(epath.Path(manager.directory) / str(step))


class CheckpointWriter:
    """Saves the checkpoints of one run; see the module docstring for what each save guarantees."""

    def __init__(self, workdir: PathLike, *, keep: int):
        self.manager = make_manager(workdir)
        self.keep = keep
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="checkpoint-hash")
        self._hashing: dict[int, concurrent.futures.Future] = {}
        self._in_flight: int | None = None

    def save(
        self,
        step: int,
        arrays: dict[str, Any],
        config: ml_collections.ConfigDict,
        data_state: bytes | None,
    ) -> None:
        """Checks and digests `arrays` ({item: pytree} for each of ARRAY_ITEMS) on the devices, then writes
        them in the background."""
        if set(arrays) != set(ARRAY_ITEMS):
            raise ValueError(f"a checkpoint holds the array items {ARRAY_ITEMS}, got {sorted(arrays)}")
        digests, nonfinite = {}, []
        for name, tree in arrays.items():
            digests[name], bad = integrity.digest_tree(tree)
            readable = integrity.readable_paths(tree)
            nonfinite += [f"{name}/{readable.get(path, path)}" for path in bad]
        if nonfinite:
            good = self.last_good_step()
            shown = ", ".join(nonfinite[:4]) + (
                f" and {len(nonfinite) - 4} more" if len(nonfinite) > 4 else ""
            )
            raise NonFiniteError(
                f"the train state at step {step} holds NaN/inf values ({shown}); it was not saved. "
                + (
                    f"The last good checkpoint is step {good} ({_step_dir(self.manager, good)}). "
                    if good is not None
                    else "No checkpoint was written yet. "
                )
                + "Lower config.optim.learning_rate or enable config.optim.grad_clip, then rerun to resume."
            )
        items = dict(
            **{name: ocp.args.StandardSave(tree) for name, tree in arrays.items()},
            config=ocp.args.JsonSave(config_to_json_dict(config)),
            integrity=ocp.args.JsonSave({"version": integrity.DIGEST_VERSION, "digests": digests}),
        )
        if data_state is not None:
            items["data"] = ocp.args.JsonSave({"iterator": data_state.decode()})
        # Orbax first waits for the previous save, so that one is complete on disk once this call returns.
        self.manager.save(step, args=ocp.args.Composite(**items))
        self._after_finished(self._in_flight)
        self._in_flight = step

    def _after_finished(self, step: int | None) -> None:
        if step is not None:
            path = _step_dir(self.manager, step)
            self._hashing[step] = self._hasher.submit(
                integrity.write_file_manifest, path, jax.process_index()
            )
        self._prune()

    def wait(self) -> None:
        """Blocks until every save is written and read back, then prunes."""
        self.manager.wait_until_finished()
        self._after_finished(self._in_flight)
        self._in_flight = None
        for step, future in list(self._hashing.items()):
            try:
                future.result()
            except Exception as err:  # an unreadable new checkpoint must not end the run: keep older ones
                log.warning(
                    "checkpoint %s could not be read back after writing (%s); the newest read-back "
                    "checkpoint before it is kept",
                    _step_dir(self.manager, step),
                    _one_line(err),
                )
        self._hashing.clear()
        self._prune()

    def last_good_step(self) -> int | None:
        """The newest step saved or being saved (every save passed the finite check first)."""
        steps = set(self.manager.all_steps()) | ({self._in_flight} if self._in_flight is not None else set())
        return max(steps, default=None)

    def _prune(self) -> None:
        # Every process decides alike (same files) and calls Orbax's delete, which syncs the processes.
        finished = sorted(s for s in self.manager.all_steps() if s != self._in_flight)
        keep = set(finished[-self.keep :])
        read_back = [s for s in finished if integrity.has_file_manifest(_step_dir(self.manager, s))]
        if read_back:
            keep.add(read_back[-1])  # the newest checkpoint known sound stays until a newer one is
        for step in finished:
            future = self._hashing.get(step)
            if step not in keep and (future is None or future.done()):
                self.manager.delete(step)
                self._hashing.pop(step, None)

    def close(self) -> None:
        self.wait()
        self._hasher.shutdown()
        self.manager.close()


@dataclasses.dataclass(frozen=True)
class Restored:
    step: int
    items: dict[str, Any]  # the array items asked for, by name
    data_state: bytes | None


def _one_line(err: BaseException) -> str:
    """The readable cause of an Orbax/TensorStore error in one line: the innermost exception of the chain
    (TensorStore's status, e.g. 'OUT_OF_RANGE: ... byte range ...'), without the long spec dumps."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__
    for inner in reversed(chain):
        status = re.search(rf"({'|'.join(_TENSORSTORE_STATUSES)}): [^\n]*", str(inner))
        if status:
            return status.group(0)[:500]
    inner = chain[-1]
    text = str(inner).strip().splitlines()[0] if str(inner).strip() else ""
    return f"{type(inner).__name__}: {text[:300]}" if text else type(inner).__name__


def _differences(saved: Any, current: Any, prefix: str) -> list[str]:
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            out += _differences(saved.get(key), current.get(key), f"{prefix}.{key}")
        return out
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} vs config {current!r}"]


def _silence_aborted_reads() -> None:
    """After a failed restore, TensorStore still completes the reads already in flight and reports each to
    Orbax's event loop, which the failure closed: hundreds of 'Event loop is closed' tracebacks through
    `sys.unraisablehook`. Drop exactly those (the failure itself is reported once, by us)."""
    previous = sys.unraisablehook
    if getattr(previous, "_drops_closed_loop_reports", False):
        return

    def hook(unraisable: Any) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook._drops_closed_loop_reports = True
    sys.unraisablehook = hook


def _restore_item(manager: ocp.CheckpointManager, step: int, name: str, args: Any) -> Any:
    try:
        return manager.restore(step, args=ocp.args.Composite(**{name: args}))[name]
    except Exception as err:  # Orbax/TensorStore raise many types for unreadable files; all mean damage
        _silence_aborted_reads()
        path = _step_dir(manager, step)
        cause = _one_line(err).replace(f'local file "{path}/', 'file "')  # paths relative to the checkpoint
        raise CheckpointDamagedError(path, f"{name}: {cause}") from err


def _leaves_by_path(tree: Any) -> dict[str, Any]:
    """{'opt_state/1/0/mu/unet/conv_in/kernel': leaf}: one name for a leaf whether it sits in a namedtuple
    (an optax state asked for) or in the dict Orbax stored it as (the names the digests use)."""
    return dict(zip(integrity.leaf_paths(tree), jax.tree.leaves(tree), strict=True))


def _shape_and_dtype(leaf: Any) -> str:
    dtype = getattr(leaf, "dtype", None)
    return f"{tuple(getattr(leaf, 'shape', ()))} {dtype}" if dtype is not None else str(tuple(leaf.shape))


def _same_dtype(a: Any, b: Any) -> bool:
    try:
        return np.dtype(a) == np.dtype(b)
    except TypeError:  # extended dtypes (typed PRNG keys) have no numpy dtype
        return str(a) == str(b)


def _stored_metadata(path: str, name: str) -> Any:
    """The tree of array metadata (shape, dtype; no values) Orbax stored for item `name`."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(epath.Path(path) / name)
    except Exception as err:  # an unreadable _METADATA: the restore could not read the item either
        raise CheckpointDamagedError(path, f"{name}: {_one_line(err)}") from err
    finally:
        handler.close()


def _arrays(count: int) -> str:
    return f"{count} array" if count == 1 else f"{count} arrays"


def _listed(entries: list[str], shown: int = 5) -> str:
    more = f"\n    ... and {len(entries) - shown} more" if len(entries) > shown else ""
    return "".join(f"\n    {e}" for e in entries[:shown]) + more


def _check_stored_structure(path: str, requested: dict[str, Any]) -> None:
    """Refuses (CheckpointError) a checkpoint whose stored arrays are not the ones asked for: other shapes
    or dtypes, arrays missing, arrays not asked for. Reads only metadata, before any array; the config
    diff misses a config edited by hand or a caller whose structures come from another model."""
    differ, missing, unexpected = [], [], []
    for name, structs in requested.items():
        stored = _leaves_by_path(_stored_metadata(path, name))
        asked = _leaves_by_path(structs)
        for key, want in asked.items():
            have = stored.get(key)
            if have is None:
                missing.append(f"{name}/{key} {_shape_and_dtype(want)}")
            elif tuple(have.shape) != tuple(want.shape) or not _same_dtype(have.dtype, want.dtype):
                differ.append(
                    f"{name}/{key}: checkpoint {_shape_and_dtype(have)} vs asked {_shape_and_dtype(want)}"
                )
        unexpected += [f"{name}/{key} {_shape_and_dtype(stored[key])}" for key in stored if key not in asked]
    if not (differ or missing or unexpected):
        return
    parts = []
    if differ:
        parts.append(f"  {_arrays(len(differ))} with other shapes or dtypes:{_listed(differ)}")
    if missing:
        parts.append(f"  {_arrays(len(missing))} asked for, not in the checkpoint:{_listed(missing)}")
    if unexpected:
        parts.append(f"  {_arrays(len(unexpected))} in the checkpoint, not asked for:{_listed(unexpected)}")
    raise CheckpointError(
        f"checkpoint {path} holds a different architecture than the one asked for:\n"
        + "\n".join(parts)
        + "\nUse the checkpoint's config (sample.py reads it from the workdir) or a new --workdir."
    )


def _in_stored_layout(
    config: ml_collections.ConfigDict, saved: ml_collections.ConfigDict
) -> ml_collections.ConfigDict:
    """`config` asking for the weights in the layout the checkpoint stores them in (`optim.stack_by_shape`):
    sampling reads either; resuming training in the other is refused (`_check_state_layout`)."""
    if stacking.enabled(config) == stacking.enabled(saved):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.optim.stack_by_shape = stacking.enabled(saved)
    return config


def _check_state_layout(
    path: str, saved: ml_collections.ConfigDict, config: ml_collections.ConfigDict
) -> None:
    """Refuses resuming with another `optim.stack_by_shape`: the weights, EMA and optimizer state are
    stored in its layout (sampling converts the weights and is not affected)."""
    stored, asked = stacking.enabled(saved), stacking.enabled(config)
    if stored != asked:
        raise CheckpointError(
            f"checkpoint {path} holds its training state with optim.stack_by_shape={stored}, and the config "
            f"asks for {asked}; the state's layout follows it. Resume with "
            f"--config.optim.stack_by_shape={stored}, or start a new --workdir."
        )


def _saved_config(manager: ocp.CheckpointManager, step: int) -> dict:
    """The config stored with checkpoint `step`, as its JSON dict."""
    saved = _restore_item(manager, step, "config", ocp.args.JsonRestore())
    if not isinstance(saved, dict):
        raise CheckpointDamagedError(_step_dir(manager, step), "config: not a JSON object")
    # Checkpoints written before `model.scan_blocks` existed hold every block unrolled.
    if isinstance(saved.get("model"), dict):
        saved["model"].setdefault("scan_blocks", False)
    return saved


def _check_architecture(path: str, saved: dict, config: ml_collections.ConfigDict) -> None:
    """Refuses `config` when its architecture (`ARCHITECTURE_KEYS`, less the runtime model keys) differs
    from the one checkpoint `path` was trained with (`saved`, its stored config)."""
    current = config_to_json_dict(config)
    diffs = [
        d
        for k in ARCHITECTURE_KEYS
        for d in _differences(saved.get(k), current.get(k), k)
        if not any(d.startswith(f"model.{key}:") for key in RUNTIME_MODEL_KEYS)
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} was trained with a different architecture:\n  "
            + "\n  ".join(diffs)
            + "\nUse the checkpoint's config (sample.py reads it from the workdir) or a new --workdir."
        )


def check_resumable(workdir: PathLike, config: ml_collections.ConfigDict) -> None:
    """Refuses, before a run writes anything into `workdir`, a config that cannot resume the checkpoints
    there: another architecture (a workdir of another stage, say) or another state layout. Only the newest
    checkpoint whose config reads is consulted; damage is left to the restore, which names it."""
    if not has_checkpoints(workdir):
        return
    manager = make_manager(workdir, create=False)
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            saved = _saved_config(manager, step)
        except CheckpointDamagedError:
            continue
        path = _step_dir(manager, step)
        _check_architecture(path, saved, config)
        _check_state_layout(path, ml_collections.ConfigDict(saved), config)
        return


def restore_verified(
    manager: ocp.CheckpointManager,
    step: int,
    abstract_items: Callable[[ml_collections.ConfigDict], dict[str, Any]],
    config: ml_collections.ConfigDict | None = None,
) -> Restored:
    """Restores the array items of `step` that `abstract_items(config)` asks for ({item name: pytree of
    ShapeDtypeStructs with shardings}), after checking them; other items are not read.

    Raises CheckpointDamagedError (unreadable or changed files, digests that differ) or CheckpointError
    (another architecture than `config`, `config=None` using the checkpoint's own; or stored arrays whose
    paths, shapes or dtypes differ from the requested structures).
    """
    path = _step_dir(manager, step)
    if not epath.Path(path).is_dir():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist; steps here: {manager.all_steps()}.")
    problem = integrity.check_file_manifests(path)
    if problem:
        raise CheckpointDamagedError(path, problem)
    saved_config = _saved_config(manager, step)
    if config is not None:
        _check_architecture(path, saved_config, config)
    saved_config = ml_collections.ConfigDict(saved_config)
    if not (epath.Path(path) / "integrity").is_dir():
        raise CheckpointDamagedError(path, "integrity/ is missing: no content digests to verify against")
    record = _restore_item(manager, step, "integrity", ocp.args.JsonRestore())
    if not isinstance(record, dict) or not isinstance(record.get("version"), int):
        raise CheckpointDamagedError(path, "integrity: no content digests of a known version")
    if record["version"] != integrity.DIGEST_VERSION:
        raise CheckpointError(
            f"checkpoint {path} is in the format of an earlier imagen_jax (version {record['version']}, "
            f"this one reads {integrity.DIGEST_VERSION}): train it again with this version."
        )
    requested = abstract_items(saved_config if config is None else _in_stored_layout(config, saved_config))
    if config is not None and "train" in requested:
        _check_state_layout(path, saved_config, config)
    _check_stored_structure(path, requested)
    items = {}
    for name, structs in requested.items():
        tree = _restore_item(manager, step, name, ocp.args.StandardRestore(structs))
        mismatches = integrity.digest_mismatches(
            record["digests"].get(name, {}), integrity.digest_tree(tree)[0]
        )
        if mismatches:
            more = f" (and {len(mismatches) - 1} more)" if len(mismatches) > 1 else ""
            raise CheckpointDamagedError(path, f"{name}: {mismatches[0]}{more}")
        items[name] = tree
    data_state = None
    if (epath.Path(path) / "data").is_dir():
        data = _restore_item(manager, step, "data", ocp.args.JsonRestore())
        try:
            data_state = data["iterator"].encode()
        except (TypeError, KeyError, AttributeError) as err:
            raise CheckpointDamagedError(path, "data: no input-pipeline position") from err
    return Restored(step=step, items=items, data_state=data_state)


def restore_newest_good(
    workdir: PathLike,
    abstract_items: Callable[[ml_collections.ConfigDict], dict[str, Any]],
    config: ml_collections.ConfigDict | None = None,
    step: int | None = None,
) -> tuple[Restored, list[CheckpointDamagedError]]:
    """The newest checkpoint in `workdir` that passes `restore_verified`, and the damaged newer ones.

    Each damaged one is logged as a one-line warning. With `step`, only that checkpoint is tried and its
    damage is an error. Raises CheckpointNotFoundError when there is none, CheckpointError when none is good.
    """
    directory = checkpoint_dir(workdir)
    if not epath.Path(directory).is_dir():
        raise CheckpointNotFoundError(
            f"no checkpoints in {directory!r}: train first "
            f"(python train.py --config ... --workdir {workdir})."
        )
    manager = make_manager(workdir, create=False)
    steps = sorted(manager.all_steps(), reverse=True) if step is None else [step]
    if not steps:
        raise CheckpointNotFoundError(f"{directory!r} holds no finished checkpoint; train first.")
    damaged: list[CheckpointDamagedError] = []
    for candidate in steps:
        try:
            return restore_verified(manager, candidate, abstract_items, config), damaged
        except CheckpointDamagedError as err:
            if step is not None:
                raise CheckpointDamagedError(
                    err.path, f"{err.cause}. Leave out the step to use the newest good checkpoint."
                ) from err
            log.warning("%s; trying the previous checkpoint", err)
            damaged.append(err)
    raise CheckpointError(
        f"no usable checkpoint in {directory}: "
        + "; ".join(f"{epath.Path(e.path).name}: {e.cause}" for e in damaged)
        + ". Restore the files from a copy, or start a new --workdir."
    )


def set_aside(workdir: PathLike, damaged: list[CheckpointDamagedError]) -> None:
    """Moves damaged checkpoints out of `checkpoints/`, so training can save those steps again."""
    if not distributed.is_primary() or not damaged:
        return
    target = epath.Path(damaged_dir(workdir))
    target.mkdir(parents=True, exist_ok=True)
    for err in damaged:
        source = epath.Path(err.path)
        dest = target / f"{source.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        source.rename(dest)
        log.warning("moved damaged checkpoint %s to %s", err.path, dest)
