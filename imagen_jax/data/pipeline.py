"""Input pipeline: a random-access source -> grain DataLoader -> numpy batch dicts for one host.

Sources are anything with len/getitem returning dicts: a TFDS ArrayRecord source
(`builder.as_data_source(split)`, text as bytes) or `FolderSource`. Batches are per host
(`batch_size // process_count`): every process shuffles the same global order and reads only its
contiguous slice of each global batch (`ProcessSlice`), so the global batches, their row order and each
record's random crop are the same on 1 or N processes. Images become float32 in [-1, 1] once per batch
(vectorised), not per record.

Super-resolution records hold "image" and "lowres" (`sources.build_source`); `crop_size` > 0 cuts a
random aligned crop of both per record (`AlignedCrop`) before batching.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import grain.python as grain
import jax
import numpy as np

from imagen_jax.errors import ConfigError, DataError

TokenizeFn = Callable[[list[str]], Mapping[str, np.ndarray]]
_TEXT_KEYS = ("caption", "scene")


def as_str(x: object) -> str:
    """TFDS Text features come back as bytes; folder sources give str."""
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def read_text_columns(
    source: Sequence[Mapping[str, object]], keys: Sequence[str], chunk: int = 1024
) -> dict[str, list[str]]:
    """The text fields `keys` of every record of `source`, in order, as str (what a run learns its
    vocabulary, pretrains its T5 and caches embeddings from). A source with `text_columns` gives them
    without loading any image (`FolderSource`); one with `__getitems__` is read `chunk` records at a time
    (TFDS's ArrayRecord sources: about 4x faster than one at a time); any other one record at a time.
    Records without one of the keys raise DataError."""
    if hasattr(source, "text_columns"):
        return source.text_columns(keys)
    read_many = getattr(source, "__getitems__", None)
    columns: dict[str, list[str]] = {key: [] for key in keys}
    for start in range(0, len(source), chunk):
        indices = list(range(start, min(start + chunk, len(source))))
        for record in read_many(indices) if read_many else (source[i] for i in indices):
            for key in keys:
                if key not in record:
                    raise DataError(f"the dataset's records have no {key!r} (only {sorted(record)}).")
                columns[key].append(as_str(record[key]))
    return columns


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 pixels -> float32 in [-1, 1], the range every stage trains and samples in."""
    return np.asarray(images).astype(np.float32) * np.float32(2 / 255) - np.float32(1)


class _CollateBatch:
    """grain batch_fn: stack records, scale images, decode text, tokenize captions; a class so it pickles."""

    def __init__(self, image_keys: Mapping[str, str] | None, tokenize_fn: TokenizeFn | None):
        self.image_keys = image_keys
        self.tokenize_fn = tokenize_fn

    def __call__(self, records: Sequence[Mapping[str, object]]) -> dict[str, np.ndarray]:
        keys = list(records[0])
        image_keys = self.image_keys
        if image_keys is None:  # one image key -> "image"; several (SR pairs) keep their names
            found = [k for k in keys if k.startswith("image") or k == "lowres"]
            image_keys = {found[0]: "image"} if len(found) == 1 else {k: k for k in found}
        out: dict[str, np.ndarray] = {}
        for src, dst in image_keys.items():
            images = np.stack([np.asarray(r[src]) for r in records])
            out[dst] = to_model_range(images)
        for key in keys:
            if key in image_keys:
                continue
            if key in _TEXT_KEYS:
                out[key] = np.array([as_str(r[key]) for r in records], dtype=object)
            else:
                out[key] = np.stack([np.asarray(r[key]) for r in records])
        if self.tokenize_fn is not None:
            out.update(self.tokenize_fn([str(c) for c in out["caption"]]))
        return out


class AlignedCrop(grain.RandomMapTransform):
    """A random `size` crop of "image" and the exactly matching crop of "lowres" (size / scale).

    The corner is drawn in low-res pixels and scaled up, so it sits on a multiple of the scale factor
    (image side / lowres side) and the low-res crop covers the same region, not a resampled neighbour.
    grain seeds `rng` from the loader seed and the record's position in the stream, so crops repeat
    for a seed and a restored iterator continues with the same crops.
    """

    def __init__(self, size: int):
        self.size = size

    def random_map(self, element: Mapping[str, object], rng: np.random.Generator) -> dict[str, object]:
        if "lowres" not in element:
            raise DataError(f"crop_size={self.size} needs records with 'image' and 'lowres' (an SR stage)")
        image, lowres = np.asarray(element["image"]), np.asarray(element["lowres"])
        (h, w), (lh, lw) = image.shape[:2], lowres.shape[:2]
        scale = h // lh
        if (h, w) != (lh * scale, lw * scale) or self.size % scale or self.size > min(h, w):
            raise DataError(
                f"crop_size={self.size} does not fit image {image.shape} / lowres {lowres.shape}: it must "
                f"be a multiple of the scale {scale} and at most the image side"
            )
        low = self.size // scale
        y, x = int(rng.integers(lh - low + 1)), int(rng.integers(lw - low + 1))
        out = dict(element)
        out["lowres"] = lowres[y : y + low, x : x + low]
        out["image"] = image[y * scale : (y + low) * scale, x * scale : (x + low) * scale]
        return out


class ProcessSlice:
    """A grain sampler: this process's `per_host` consecutive records of each global batch of `sampler`
    (the same on every process), numbered locally so the loader's saved position is this process's."""

    def __init__(self, sampler: grain.IndexSampler, process: int, count: int, per_host: int):
        self.sampler, self.process, self.count, self.per_host = sampler, process, count, per_host

    def __getitem__(self, index: int) -> grain.RecordMetadata:
        batch, offset = divmod(index, self.per_host)
        meta = self.sampler[(batch * self.count + self.process) * self.per_host + offset]
        return grain.RecordMetadata(index=index, record_key=meta.record_key, rng=meta.rng)

    def __repr__(self) -> str:  # grain checks a restored iterator's sampler by its repr: keep it stable
        return (
            f"ProcessSlice({self.sampler!r}, process={self.process}, count={self.count}, "
            f"per_host={self.per_host})"
        )


def make_loader(
    source: object,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    tokenize_fn: TokenizeFn | None = None,
    image_keys: Mapping[str, str] | None = None,
    worker_count: int = 0,
    num_threads: int = 4,
    prefetch: int = 256,
    shard_by_process: bool = True,
    drop_remainder: bool = True,
    crop_size: int = 0,
) -> grain.DataLoader:
    """A grain DataLoader yielding this host's batches; iterate it (or `iter(...)`) for numpy dicts.

    Batch: every image key as float32 NHWC in [-1, 1] (one image key is renamed "image"; pass
    `image_keys={"image_64": "low_res", "image_256": "image"}` to pick/rename), "caption" (and "scene" when
    present) as object arrays of str, plus `tokenize_fn(captions)` outputs (e.g. text_ids, text_mask).
    `batch_size` is global: each of the `jax.process_count()` hosts gets batch_size // process_count.
    `num_epochs=None` repeats forever. `worker_count` > 0 uses that many worker processes (then
    `tokenize_fn` must pickle); `num_threads`/`prefetch` tune reads in the main process.
    `crop_size` > 0 (config.data.crop_resolution, SR stages): "image" becomes a random crop_size crop and
    "lowres" the matching crop_size / scale region (`AlignedCrop`); 0 keeps whole images.
    """
    count = jax.process_count() if shard_by_process else 1
    if batch_size % count:
        raise ConfigError(f"global batch_size {batch_size} is not divisible by process_count {count}")
    if crop_size < 0:
        raise ConfigError(f"crop_size={crop_size}: expected 0 (whole images) or a positive crop side")
    per_host = batch_size // count
    sampler = grain.IndexSampler(
        num_records=len(source),
        shard_options=grain.NoSharding(),
        shuffle=shuffle,
        num_epochs=num_epochs,
        seed=seed,
    )
    if count > 1:
        sampler = ProcessSlice(sampler, jax.process_index(), count, per_host)
    collate = _CollateBatch(image_keys, tokenize_fn)
    crop = [AlignedCrop(crop_size)] if crop_size else []
    return grain.DataLoader(
        data_source=source,
        sampler=sampler,
        shard_options=grain.NoSharding(),
        operations=[*crop, grain.Batch(per_host, drop_remainder=drop_remainder, batch_fn=collate)],
        worker_count=worker_count,
        read_options=grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch),
    )


def measure_throughput(
    loader: Iterable[Mapping[str, np.ndarray]], num_batches: int, *, warmup: int = 2
) -> float:
    """Images per second delivered by `loader` over `num_batches` batches, after `warmup` batches."""
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    images = 0
    start = time.perf_counter()
    for _ in range(num_batches):
        batch = next(it)
        images += len(batch["caption"])
    return images / (time.perf_counter() - start)
