"""Precomputed T5 embeddings of a dataset's captions, so training need not run T5 every step.

`EmbeddingCache.build(captions, text_encoder, out_dir)` encodes each distinct caption once (batched, the
batch sharded over a mesh when given, with a progress bar) and writes a folder:
  meta.json            count, length (longest caption's tokens), embed_dim, dtype, encoder, max_length
  keys.npy             [N] sorted caption keys (hex blake2b-128 of the UTF-8 caption)
  lengths.npy          [N] int32 tokens per caption (EOS included); the mask is the first `length` slots
  embeddings.array_record   record i = caption i's embedding [length_i, embed_dim] as raw `dtype` bytes
Records hold only real tokens (no padding), so an XXL cache of short captions is a fraction of the padded
size; bfloat16 halves it again. `EmbeddingCache.open(out_dir).lookup(captions)` returns numpy
(emb [B, length, D], mask [B, length]) padded to the cache's `length`, the same shape every call (one
compilation of the train step). Empty / whitespace-only captions are the unconditional prompt: zeros and
an all-False mask, stored or not.

Training: build the cache once for the dataset's captions (the lead's config switch selects it); in the
input pipeline replace the tokenizer output by `lookup(batch_captions)` and feed (emb, mask) to the model
instead of calling `encode_tokens`; check `cache.check(embed_dim=..., encoder=...)` at start-up.

Storage: the folder may be local or a `gs://` URL. Small files go through `etils.epath` (which needs
`gcsfs`, or TensorFlow's gfile, for `gs://`); the records through array_record, whose reader opens `gs://`
itself but whose writer writes only local files, so a remote build writes the records to a local temporary
file and copies it up. Multi-host: every process calls `build` (the encoder may be sharded across hosts),
only process 0 writes, and all return once the folder is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from imagen_jax.errors import ConfigError, DataError
from imagen_jax.parallel import distributed
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text.encoder import TextEncoder

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
_RECORDS = "embeddings.array_record"
_LENGTH_BUCKET = 16  # encode at the batch's length rounded up to this: few compilations, less compute


def caption_key(caption: str) -> bytes:
    """The cache key of a caption: hex blake2b-128 of its exact UTF-8 text (no normalisation)."""
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=16).hexdigest().encode("ascii")


def _is_unconditional(caption: str) -> bool:
    return not caption.strip()


def _is_remote(path: epath.Path) -> bool:
    """A URL (gs://, s3://, ...) rather than a local file system path."""
    return "://" in os.fspath(path)


def _load_npy(path: epath.Path) -> np.ndarray:
    with path.open("rb") as f:
        return np.load(f)


def _save_npy(path: epath.Path, array: np.ndarray) -> None:
    with path.open("wb") as f:
        np.save(f, array)


class EmbeddingCache:
    """A read-only cache folder; open it with `EmbeddingCache.open(path)`."""

    def __init__(self, path: epath.Path, meta: dict[str, Any], keys: np.ndarray, lengths: np.ndarray):
        self.path = path
        self.meta = meta
        self.keys = keys
        self.lengths = lengths
        self.dtype = np.dtype(_DTYPES[meta["dtype"]])
        self.length = int(meta["length"])
        self.embed_dim = int(meta["embed_dim"])
        self._reader = None
        self._reader_pid = None

    def __len__(self) -> int:
        return len(self.keys)

    def __contains__(self, caption: str) -> bool:
        i = np.searchsorted(self.keys, caption_key(caption))
        return bool(i < len(self.keys) and self.keys[i] == caption_key(caption))

    @classmethod
    def open(cls, path: str | os.PathLike) -> EmbeddingCache:
        path = epath.Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"no embedding cache at {path} (meta.json missing); build it with EmbeddingCache.build."
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: cache format {meta.get('format_version')}, expected {FORMAT_VERSION}; "
                             "rebuild it.")
        keys = _load_npy(path / "keys.npy")
        lengths = _load_npy(path / "lengths.npy")
        if len(keys) != meta["count"] or len(lengths) != meta["count"]:
            raise DataError(f"{path}: keys/lengths disagree with meta.json count {meta['count']}; rebuild.")
        if not (path / _RECORDS).is_file():
            raise DataError(f"{path}: {_RECORDS} is missing (an interrupted copy?); rebuild the cache.")
        return cls(path, meta, keys, lengths)

    def check(self, embed_dim: int | None = None, encoder: str | None = None) -> None:
        """Raises ValueError when the cache was built for another encoder than the one configured."""
        if embed_dim is not None and embed_dim != self.embed_dim:
            raise ConfigError(f"embedding cache {self.path} has embed_dim {self.embed_dim}, model expects "
                             f"{embed_dim}; rebuild the cache with the configured text encoder.")
        if encoder is not None and encoder != self.meta.get("encoder"):
            built = self.meta.get("encoder")
            raise ConfigError(f"embedding cache {self.path} was built with encoder {built!r}, config says "
                             f"{encoder!r}; rebuild it or point the config at the right cache.")

    def _read(self, indices: list[int]) -> list[bytes]:
        from array_record.python.array_record_module import ArrayRecordReader

        if self._reader is None or self._reader_pid != os.getpid():  # one reader per (forked) process
            self._reader = ArrayRecordReader(os.fspath(self.path / _RECORDS))  # opens gs:// itself
            self._reader_pid = os.getpid()
        return self._reader.read(indices)

    def lookup(
        self, captions: Sequence[str], dtype: Any = None, length: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(emb [B, L, D] in the cache dtype (or `dtype`), mask bool [B, L]) for the captions; L is the
        cache's `length`, or `length` (>= it) to pad to the tokenizer's max length as encoding would."""
        length = self.length if length is None else length
        if length < self.length:
            raise ValueError(f"length={length} is shorter than the cached captions ({self.length} tokens).")
        if isinstance(captions, str):
            raise TypeError("captions must be a sequence of strings, got a single str; wrap it in a list.")
        captions = list(captions)
        if not captions:
            raise ValueError("captions is empty.")
        emb = np.zeros((len(captions), length, self.embed_dim), self.dtype)
        mask = np.zeros((len(captions), length), np.bool_)
        rows, indices, missing = [], [], []
        for b, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {b} is {type(caption).__name__}, expected str.")
            if _is_unconditional(caption):
                continue
            key = caption_key(caption)
            i = int(np.searchsorted(self.keys, key))
            if i >= len(self.keys) or self.keys[i] != key:
                missing.append(caption)
                continue
            rows.append(b)
            indices.append(i)
        if missing:
            raise KeyError(
                f"{len(missing)} captions are not in the embedding cache {self.path}, e.g. "
                f"{missing[0][:80]!r}; rebuild the cache for this dataset (EmbeddingCache.build)."
            )
        if indices:
            for b, i, record in zip(rows, indices, self._read(indices), strict=True):
                n = int(self.lengths[i])
                emb[b, :n] = np.frombuffer(record, self.dtype).reshape(n, self.embed_dim)
                mask[b, :n] = True
        return (emb if dtype is None else emb.astype(dtype)), mask

    @classmethod
    def build(
        cls,
        captions: Iterable[str],
        text_encoder: TextEncoder,
        out_path: str | os.PathLike,
        *,
        batch_size: int = 64,
        dtype: str = "bfloat16",
        mesh: Mesh | None = None,
        rules: Sequence[Any] | None = None,
        encoder_name: str = "",
        progress: bool = True,
        overwrite: bool = False,
    ) -> EmbeddingCache:
        """Encodes every distinct non-empty caption once and writes the cache folder `out_path`.

        The folder is written under a temporary name and renamed when complete, so an interrupted build
        never leaves a cache that opens. With a mesh, each batch is sharded over the batch mesh axis
        (`batch_size` must divide over it); the encoder params may be sharded too.

        Multi-host: call it on every process with the same captions (the encoding is one computation over
        the mesh); only process 0 writes, and every process returns after the folder is complete.
        """
        from array_record.python.array_record_module import ArrayRecordWriter
        from tqdm.auto import tqdm

        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}; expected one of {sorted(_DTYPES)}.")
        out = epath.Path(out_path)
        primary = distributed.is_primary()
        exists = out.exists()
        if jax.process_count() > 1:  # every process takes the same branch (and waits for all to arrive)
            exists = bool(multihost_utils.broadcast_one_to_all(np.int32(exists)))
        if exists and not overwrite:
            raise FileExistsError(f"{out} exists; pass overwrite=True to rebuild the cache.")
        unique: dict[bytes, str] = {}
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise TypeError(f"caption {i} is {type(caption).__name__}, expected str.")
            if not _is_unconditional(caption):
                unique.setdefault(caption_key(caption), caption)
        keys = sorted(unique)  # records in key order: lookup's searchsorted index is the record index
        if mesh is not None:
            mesh_lib.check_batch_divisible(batch_size, mesh, rules)
            sharding = mesh_lib.batch_sharding(mesh, rules, 2)
        tmp = out.with_name(out.name + ".tmp")
        np_dtype = _DTYPES[dtype]
        lengths = np.zeros(len(keys), np.int32)
        writer = staging = None
        if primary:
            if tmp.exists():
                tmp.rmtree()
            tmp.mkdir(parents=True)
            # array_record writes local files only: a remote cache's records are staged locally first.
            staging = tempfile.TemporaryDirectory(prefix="embedding_cache.") if _is_remote(tmp) else None
            records = epath.Path(staging.name) / _RECORDS if staging else tmp / _RECORDS
            # One record per chunk for cheap random access; float embeddings barely compress, so no zstd.
            writer = ArrayRecordWriter(os.fspath(records), "group_size:1,uncompressed")
        n_truncated = 0
        try:
            bar = tqdm(
                total=len(keys), desc="T5 embeddings", unit="caption", disable=not (progress and primary)
            )
            for start in range(0, len(keys), batch_size):
                batch = [unique[k] for k in keys[start : start + batch_size]]
                n = len(batch)
                with warnings.catch_warnings(record=True) as caught:  # summarised below, not one per caption
                    warnings.simplefilter("always")
                    tokens = text_encoder.tokenizer(batch + [""] * (batch_size - n))  # static batch shape
                n_truncated += sum("truncated" in str(w.message) for w in caught)
                ids, mask = tokens["text_ids"], tokens["text_mask"]
                # Padding does not change real tokens' outputs, so encode only up to the batch's longest.
                width = min(ids.shape[1], -(-int(mask.sum(1).max()) // _LENGTH_BUCKET) * _LENGTH_BUCKET)
                ids, mask = ids[:, :width], mask[:, :width]
                lens = mask[:n].sum(1).astype(np.int32)
                if mesh is not None:
                    ids, mask = jax.device_put(ids, sharding), jax.device_put(mask, sharding)
                emb = text_encoder.encode_ids(ids, mask).astype(jnp.float32)
                if emb.is_fully_addressable:
                    emb = jax.device_get(emb)
                else:  # the batch is sharded over other hosts' devices too: gather it (all processes)
                    emb = multihost_utils.process_allgather(emb, tiled=True)
                emb = np.asarray(emb)[:n].astype(np_dtype)
                lengths[start : start + n] = lens
                if writer is not None:
                    for row, length in zip(emb, lens, strict=True):
                        writer.write(np.ascontiguousarray(row[:length]).tobytes())
                bar.update(n)
            bar.close()
        finally:
            if writer is not None:
                writer.close()
        if n_truncated:
            warnings.warn(f"{n_truncated} captions were longer than max_length={text_encoder.max_length} "
                          "tokens and were truncated.", stacklevel=2)
        meta = dict(
            format_version=FORMAT_VERSION, count=len(keys), length=int(lengths.max(initial=1)),
            embed_dim=int(text_encoder.embed_dim), dtype=dtype, encoder=encoder_name,
            max_length=int(text_encoder.max_length), tokenizer=repr(text_encoder.tokenizer),
        )
        if primary:
            if staging is not None:
                with staging:
                    (epath.Path(staging.name) / _RECORDS).copy(tmp / _RECORDS)
            _save_npy(tmp / "keys.npy", np.asarray(keys, dtype="S32"))
            _save_npy(tmp / "lengths.npy", lengths)
            (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
            if out.exists():
                out.rmtree()
            # Atomic locally. On GCS a folder rename copies file by file; each file lands whole or not at
            # all, and `open` refuses a folder missing any of them.
            tmp.rename(out)
            log.info("embedding cache %s: %d captions, length %d", out, len(keys), meta["length"])
        if jax.process_count() > 1:  # the others read what process 0 wrote: wait until it is there
            multihost_utils.sync_global_devices(f"embedding cache {out}")
        return cls.open(out)
