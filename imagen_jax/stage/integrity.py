"""What a checkpoint records so that a restore can prove it got back exactly what was saved.

Two records, both cheap next to the save itself:
- **Content digests** (`digest_tree`): one 64-bit hash per array of the train state, computed on the devices
  by a jitted reduction over the sharded arrays (each device hashes its own shard; nothing is gathered), in
  the same pass that checks every float is finite. The hash mixes each element's bits with its flat index
  and adds the results modulo 2^32, so it is the same for any mesh, sharding or reduction order: a
  checkpoint written on 8 devices verifies when restored onto 1. Saved as a checkpoint item (atomically
  with the arrays) and compared after the arrays are loaded, before anything uses them.
- **File manifests** (`write_file_manifest`): size and SHA-256 of every file of a finished checkpoint,
  computed in a background thread after the write, each process over the files it wrote. A restore checks
  them first, so a truncated, zeroed or changed file is named exactly, and retention treats a checkpoint
  with a manifest as read back and sound.
Neither is a cryptographic guarantee against tampering; both catch storage and copy damage.

Files are reached through `etils.epath`, so a checkpoint directory may be local or a `gs://` URL (epath
then needs `gcsfs`, or TensorFlow's gfile, and the machine's credentials).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
from etils import epath

from imagen_jax.stage import stacking

DIGEST_VERSION = 2  # 2: digests per checkpoint item (params, ema_params, train)
MANIFEST_PREFIX = "files.process_"


def _fmix32(h: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: every input bit flips each output bit with probability ~1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _as_words(x: jax.Array) -> jax.Array:
    """The raw bits of `x` as uint32 (narrower types widened), same shape."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)


@jax.jit
def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(two uint32 lanes, all finite) of one array. One small program per distinct shape/dtype/sharding:
    a single program over the whole state took ~10x longer to compile than these together."""
    words = _as_words(x)
    index = jnp.arange(words.size, dtype=jnp.uint32).reshape(words.shape)
    # _fmix32 is a bijection, so a change to any one element always changes each lane's sum; mixing in
    # the flat index makes the sum depend on positions too (swapped elements change it).
    lane_a = _fmix32(words ^ (index * jnp.uint32(0x9E3779B1)))
    lane_b = _fmix32((words + index) * jnp.uint32(0x7F4A7C15) ^ jnp.uint32(0x5BD1E995))
    lanes = [jnp.sum(lane, dtype=jnp.uint32) for lane in (lane_a, lane_b)]  # wraps mod 2^32: any order
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.bool_(True)
    return jnp.stack(lanes), finite


def leaf_paths(tree: Any) -> list[str]:
    """'params/unet/Conv_0/kernel'-style names of the leaves of `tree`, in leaf order."""
    paths = jax.tree_util.tree_flatten_with_path(tree)[0]
    return ["/".join(_key_name(k) for k in path) for path, _ in paths]


def readable_paths(tree: Any) -> dict[str, str]:
    """{`leaf_paths` name of a stack of parameters (`stacking.Stacked`): that name with the parameters the
    stack holds}, e.g. 'unet/stacks/3' -> 'unet/stacks/3 (down0_0_res/conv1/kernel and 5 more)', for
    messages; the digests keep the plain names, which are the tree Orbax stores."""
    out = {}
    is_stacked = lambda x: isinstance(x, stacking.Stacked)  # noqa: E731
    for path, node in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_stacked)[0]:
        if not is_stacked(node):
            continue
        prefix = "/".join(_key_name(k) for k in path)
        names = leaf_paths(jax.tree.unflatten(node.treedef, range(sum(map(len, node.groups)))))
        for i, group in enumerate(node.groups):
            more = f" and {len(group) - 1} more" if len(group) > 1 else ""
            out[f"{prefix}/stacks/{i}"] = f"{prefix}/stacks/{i} ({names[group[0]]}{more})"
    return out


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def digest_tree(tree: Any) -> tuple[dict[str, str], list[str]]:
    """({leaf path: 16 hex digits}, [paths of float leaves holding NaN/inf]) for a tree of arrays.

    One small device program per leaf and one host transfer; call it where the host waits anyway (a save).
    The program of a sharded leaf ends in a cross-device sum, and XLA:CPU deadlocks when several such
    programs are in flight at once, so those run one at a time (replicated leaves need no collective).
    """
    digests = []
    for x in jax.tree.leaves(tree):
        digests.append(_leaf_digest(x))
        if not getattr(x, "is_fully_replicated", True):
            jax.block_until_ready(digests[-1])
    pairs = jax.device_get(digests)
    paths = leaf_paths(tree)
    record = {p: "".join(f"{int(w):08x}" for w in d) for p, (d, _) in zip(paths, pairs, strict=True)}
    return record, [p for p, (_, ok) in zip(paths, pairs, strict=True) if not bool(ok)]


def digest_mismatches(saved: dict[str, str], restored: dict[str, str]) -> list[str]:
    """Human-readable differences between the digests recorded at save time and those of a restore."""
    out = [f"{p}: content differs from the saved" for p in saved if restored.get(p, saved[p]) != saved[p]]
    out += [f"{p}: saved but not restored" for p in saved if p not in restored]
    out += [f"{p}: restored but not in the saved record" for p in restored if p not in saved]
    return out


def _process_of(relative: str) -> int:
    """Which process wrote a checkpoint file: OCDBT keeps each process's shards under ocdbt.process_<i>/."""
    for part in relative.split("/"):
        if part.startswith("ocdbt.process_"):
            return int(part.removeprefix("ocdbt.process_"))
    return 0  # metadata, manifests and JSON items are written by the primary process


def _sha256(path: epath.Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: epath.Path, process: int | None) -> list[str]:
    """'/'-separated paths relative to `step_dir` of the files `process` wrote (all: None), sorted."""
    out = []
    for root, _, names in step_dir.walk():
        for name in names:
            rel = (root / name).relative_to(step_dir).as_posix()
            if name.startswith(MANIFEST_PREFIX) or (process is not None and _process_of(rel) != process):
                continue
            out.append(rel)
    return sorted(out)


def write_file_manifest(step_dir: str | os.PathLike, process: int = 0) -> str:
    """Records size and SHA-256 of the files `process` wrote in a finished checkpoint; returns its path.

    Written to a temporary name and renamed, so a manifest is either whole or absent (on GCS the rename is
    a copy, but an object upload is whole or absent by itself).
    """
    step_dir = epath.Path(step_dir)
    rels = _files(step_dir, process)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # hashlib releases the GIL
        hashes = list(pool.map(lambda r: _sha256(step_dir / r), rels))
    sizes = [(step_dir / r).stat().length for r in rels]
    files = {r: [n, h] for r, n, h in zip(rels, sizes, hashes, strict=True)}
    record = {"version": DIGEST_VERSION, "files": files}
    path = step_dir / f"{MANIFEST_PREFIX}{process}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    tmp.replace(path)
    return str(path)


def has_file_manifest(step_dir: str | os.PathLike) -> bool:
    return (epath.Path(step_dir) / f"{MANIFEST_PREFIX}0.json").is_file()


def check_file_manifests(step_dir: str | os.PathLike) -> str | None:
    """The first difference between a checkpoint's files and its manifests; None if none (or no manifest)."""
    step_dir = epath.Path(step_dir)
    names = [p.name for p in step_dir.iterdir()]
    manifests = sorted(n for n in names if n.startswith(MANIFEST_PREFIX) and n.endswith(".json"))
    for name in manifests:
        try:
            files = json.loads((step_dir / name).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"its file manifest {name} is unreadable ({type(err).__name__})"
        for rel, (size, _) in files.items():
            path = step_dir / rel
            if not path.is_file():
                return f"{rel} is missing"
            actual = path.stat().length
            if actual != size:
                return f"{rel} is {actual} bytes, {size} when written (truncated or overwritten)"
        rels = list(files)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            hashes = pool.map(lambda r: _sha256(step_dir / r), rels)
            for rel, digest in zip(rels, hashes, strict=True):
                if digest != files[rel][1]:
                    return f"{rel} changed after it was written (SHA-256 differs)"
    return None
