"""Loads Hugging Face T5 checkpoints (safetensors) into the Flax `T5Encoder`, without torch.

A checkpoint is a folder (or a hub id already in the local Hugging Face cache; nothing is downloaded)
holding config.json, model.safetensors or shards listed in model.safetensors.index.json, and the
tokenizer (tokenizer.json or spiece.model). Only encoder tensors are read; decoder tensors are never
touched. Memory: tensors are read one at a time with plain file reads (no mmap, so resident memory is
only what we keep), cast chunk by chunk to the requested dtype and placed on devices before the next is
read; peak host memory is the final parameters plus about one tensor. With a mesh every tensor is placed
directly with its sharding (`jax.make_array_from_callback`), so no device ever holds an unsharded copy.

HF name -> Flax path (kernels are transposed: torch Linear stores [out, in]):
  shared.weight                                         shared/embedding
  encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight
                                                        relative_attention_bias/embedding
  encoder.block.{i}.layer.0.layer_norm.weight           block_{i}/attention_norm/scale
  encoder.block.{i}.layer.0.SelfAttention.{q,k,v,o}.weight   block_{i}/attention/{q,k,v,o}/kernel  (T)
  encoder.block.{i}.layer.1.layer_norm.weight           block_{i}/mlp_norm/scale
  encoder.block.{i}.layer.1.DenseReluDense.{wi,wi_0,wi_1,wo}.weight  block_{i}/mlp/{...}/kernel  (T)
  encoder.final_layer_norm.weight                       final_norm/scale
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh

from imagen_jax.errors import DataError, InputFileNotFoundError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text.encoder import TextEncoder, check_tokenizer_vocab, parse_dtype
from imagen_jax.text.t5 import T5Config, T5Encoder
from imagen_jax.text.tokenizers import Tokenizer, load_hf_tokenizer, make_tokenizer

log = logging.getLogger(__name__)

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_CHUNK_BYTES = 16 << 20  # read/cast granularity: bounds the temporary copy while casting
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


class SafetensorsFile:
    """Minimal safetensors reader: parses the header, checks the file is complete, reads single tensors
    with plain reads. (The `safetensors` package mmaps whole files; touched mapped pages count as resident
    memory until the file is closed, which would double the peak while loading.)"""

    def __init__(self, path: str | os.PathLike):
        self.path = pathlib.Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n <= 0 or 8 + n > size:
                raise DataError(
                    f"{self.path} is not a complete safetensors file ({size} bytes, header length "
                    f"{n}). The download is probably truncated: delete the file and download it again."
                )
            try:
                header = json.loads(f.read(n))
            except ValueError as e:
                raise DataError(f"{self.path}: unreadable safetensors header ({e}); download again.") from e
        header.pop("__metadata__", None)
        self.data_start = 8 + n
        self.entries: dict[str, dict[str, Any]] = header
        end = max((e["data_offsets"][1] for e in header.values()), default=0)
        if self.data_start + end > size:
            raise DataError(
                f"{self.path} is truncated: its header needs {self.data_start + end} bytes but the file has "
                f"{size}. Delete the file and download it again."
            )

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def read(self, name: str, dtype: Any, transpose: bool = False) -> np.ndarray:
        """Tensor `name` as a new C-contiguous array of `dtype` (transposed, for 2-D, if asked), read and
        cast in chunks of rows straight into its final layout: no full-size temporary."""
        entry = self.entries[name]
        if entry["dtype"] not in _ST_DTYPES:
            raise DataError(f"{self.path}: tensor {name} has unsupported dtype {entry['dtype']}.")
        src = np.dtype(_ST_DTYPES[entry["dtype"]])
        shape = tuple(entry["shape"])
        begin, end = entry["data_offsets"]
        rows = shape[0] if shape else 1
        cols = int(np.prod(shape[1:], dtype=np.int64))
        if (end - begin) != rows * cols * src.itemsize:
            raise DataError(f"{self.path}: tensor {name} has {end - begin} bytes, expected shape {shape}.")
        if transpose and len(shape) != 2:
            raise DataError(f"{self.path}: cannot transpose {name} of shape {shape}.")
        out = _aligned_empty((cols, rows) if transpose else (rows, cols), dtype)
        step = max(1, _CHUNK_BYTES // max(1, cols * src.itemsize))  # whole rows per chunk
        buf = np.empty(min(step, rows) * cols * src.itemsize, np.uint8)
        with open(self.path, "rb") as f:
            f.seek(self.data_start + begin)
            for r0 in range(0, rows, step):
                n = min(step, rows - r0)
                view = buf[: n * cols * src.itemsize]
                if f.readinto(memoryview(view)) != view.size:
                    raise DataError(f"{self.path}: file ends inside tensor {name}; download it again.")
                chunk = view.view(src).reshape(n, cols)
                if transpose:
                    out[:, r0 : r0 + n] = chunk.T  # casts to `dtype`
                else:
                    out[r0 : r0 + n] = chunk
        return out.reshape(shape[::-1] if transpose else shape)


def _aligned_empty(shape: tuple[int, ...], dtype: Any, align: int = 64) -> np.ndarray:
    # 64-byte aligned host arrays let jax's CPU backend adopt the buffer without a copy (device_put
    # otherwise duplicates every tensor on CPU); on accelerators the host copy is freed after transfer.
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + align, np.uint8)
    offset = (-raw.ctypes.data) % align
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def resolve_checkpoint(
    path_or_hub_id: str | os.PathLike, cache_dir: str | os.PathLike | None = None
) -> pathlib.Path:
    """A local folder, or the snapshot folder of a hub id in the local Hugging Face cache (offline)."""
    text = os.fspath(path_or_hub_id)
    path = pathlib.Path(os.path.expanduser(text))
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"T5 checkpoint {text} is a file; pass the folder holding config.json.")
    if _HUB_ID.match(text):
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import LocalEntryNotFoundError

        try:
            return pathlib.Path(snapshot_download(text, local_files_only=True, cache_dir=cache_dir))
        except LocalEntryNotFoundError:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise InputFileNotFoundError(
                f"T5 checkpoint {text!r} is not a local folder and not in the Hugging Face cache "
                f"({cache_dir or HF_HUB_CACHE}). Download it once (encoder files only): hf download {text} "
                "--include 'config.json' '*.safetensors' '*.safetensors.index.json' 'spiece.model' "
                "'tokenizer*', or pass the folder path."
            ) from None
    raise InputFileNotFoundError(f"T5 checkpoint folder {text} not found; pass a folder holding config.json.")


def read_t5_config(folder: pathlib.Path) -> T5Config:
    path = folder / "config.json"
    if not path.is_file():
        raise InputFileNotFoundError(f"{path} not found: a T5 checkpoint folder needs its config.json.")
    try:
        return T5Config.from_hf_config(json.loads(path.read_text()))
    except ValueError as e:
        raise DataError(f"{path}: {e}") from e


def hf_param_names(config: T5Config) -> dict[tuple[str, ...], tuple[str, bool]]:
    """Flax param path -> (HF tensor name, transpose?) for every encoder parameter."""
    names: dict[tuple[str, ...], tuple[str, bool]] = {
        ("shared", "embedding"): ("shared.weight", False),
        ("relative_attention_bias", "embedding"): (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", False),
        ("final_norm", "scale"): ("encoder.final_layer_norm.weight", False),
    }
    mlp = ("wi_0", "wi_1", "wo") if config.feed_forward == "gated-gelu" else ("wi", "wo")
    for i in range(config.num_layers):
        hf, ours = f"encoder.block.{i}.layer", f"block_{i}"
        names[(ours, "attention_norm", "scale")] = (f"{hf}.0.layer_norm.weight", False)
        names[(ours, "mlp_norm", "scale")] = (f"{hf}.1.layer_norm.weight", False)
        for p in "qkvo":
            names[(ours, "attention", p, "kernel")] = (f"{hf}.0.SelfAttention.{p}.weight", True)
        for p in mlp:
            names[(ours, "mlp", p, "kernel")] = (f"{hf}.1.DenseReluDense.{p}.weight", True)
    return names


def _weight_files(folder: pathlib.Path) -> dict[str, pathlib.Path]:
    """HF tensor name -> file, from the index json or the single model.safetensors."""
    index = folder / _INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / _SINGLE
    if single.is_file():
        return dict.fromkeys(SafetensorsFile(single).keys(), single)
    others = sorted(p.name for p in folder.glob("*.safetensors"))
    if len(others) == 1:  # a single file under another name
        return dict.fromkeys(SafetensorsFile(folder / others[0]).keys(), folder / others[0])
    bins = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.h5"))
    hint = (
        f" It has {bins}: imagen_jax reads safetensors only (no torch). Convert once where torch is "
        "installed (T5EncoderModel.from_pretrained(folder).save_pretrained(out)) or use a revision with "
        "safetensors." if bins else ""
    )
    raise InputFileNotFoundError(f"no {_SINGLE} or {_INDEX} in {folder}.{hint}")


def load_t5_params(
    folder: str | os.PathLike,
    config: T5Config,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Sequence[Any] | None = None,
) -> Any:
    """Reads the encoder tensors of a checkpoint folder into an (unboxed) Flax param tree of `dtype`."""
    folder = pathlib.Path(folder)
    module = T5Encoder(config, dtype=dtype, param_dtype=dtype)
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids > 0)["params"])
    expected = traverse_util.flatten_dict(nn.unbox(abstract))
    shardings = traverse_util.flatten_dict(mesh_lib.tree_shardings(abstract, mesh, rules)) if mesh else {}
    names = hf_param_names(config)
    files = _weight_files(folder)
    if names[("shared", "embedding")][0] not in files and "encoder.embed_tokens.weight" in files:
        names[("shared", "embedding")] = ("encoder.embed_tokens.weight", False)  # tied copy, same tensor
    known = {hf for hf, _ in names.values()} | {"encoder.embed_tokens.weight"}
    unknown = sorted(n for n in files if n.startswith("encoder.") and n not in known)
    if unknown:
        raise DataError(
            f"{folder}: encoder tensors {unknown[:5]} do not belong to a T5 encoder with "
            f"feed_forward={config.feed_forward!r} and {config.num_layers} layers; config.json and the "
            "weights disagree (or the architecture is not T5)."
        )
    missing = sorted(hf for hf, _ in names.values() if hf not in files)
    if missing:
        raise DataError(
            f"{folder}: tensors {missing[:5]} ({len(missing)} missing) are not in the checkpoint but "
            "config.json needs them; config.json and the weights disagree."
        )
    by_file: dict[pathlib.Path, list[tuple[str, ...]]] = {}
    for path, (hf, _) in names.items():
        by_file.setdefault(files[hf], []).append(path)
    # Every check that needs no tensor data runs before the first (possibly gigabyte) read.
    for file in sorted(by_file):
        if not file.is_file():
            raise InputFileNotFoundError(
                f"shard {file.name} listed in {folder / _INDEX} is missing. The download is incomplete: "
                f"download {file.name} again (e.g. hf download <repo> {file.name})."
            )
    params: dict[tuple[str, ...], jax.Array] = {}
    for file, paths in sorted(by_file.items()):
        log.info("reading %d encoder tensors from %s", len(paths), file)
        reader = SafetensorsFile(file)
        for path in paths:
            hf, transpose = names[path]
            want = expected[path].shape
            got = reader.shape(hf)
            if (got[::-1] if transpose else got) != want:
                raise DataError(
                    f"{file}: tensor {hf} has shape {got} but config.json ({config}) implies "
                    f"{want[::-1] if transpose else want}. The config and the weights do not match."
                )
            host = reader.read(hf, dtype, transpose)
            if mesh is None:
                params[path] = jax.device_put(host)
            else:  # each device receives only its slice
                params[path] = jax.make_array_from_callback(want, shardings[path], lambda idx, h=host: h[idx])
            del host  # only one host tensor alive at a time
    return traverse_util.unflatten_dict(params)


def load_t5_encoder(
    path_or_hub_id: str | os.PathLike,
    dtype: Any = jnp.float32,
    mesh: Mesh | None = None,
    rules: Sequence[Any] | None = None,
    max_length: int = 128,
    tokenizer: str | Tokenizer | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> TextEncoder:
    """A `TextEncoder` from a Hugging Face T5 folder or cached hub id (T5, v1.1, FLAN, mT5; any size).

    dtype: parameter and compute dtype ("float32", "bfloat16" or a jnp dtype). mesh / rules: place each
    parameter sharded by its logical axes (e.g. rules [("embed", "data")] for FSDP over "data").
    tokenizer: None = the checkpoint's own; or "byte" / a spiece.model path / a folder / a Tokenizer.
    """
    dtype = parse_dtype(dtype)
    folder = resolve_checkpoint(path_or_hub_id, cache_dir)
    config = read_t5_config(folder)
    if tokenizer is None:
        tok = load_hf_tokenizer(folder, max_length)
    elif isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        tok = make_tokenizer(tokenizer, max_length)
    check_tokenizer_vocab(tok, config)  # before reading gigabytes of weights
    params = load_t5_params(folder, config, dtype, mesh, rules)
    module = T5Encoder(config, dtype=dtype, param_dtype=dtype)
    return TextEncoder(module, tok, params, config.d_model)
