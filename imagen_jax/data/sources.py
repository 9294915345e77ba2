"""`config.data` -> a random-access source for the input pipeline (one place that knows every dataset).

Stage keys (read with `.get`, so configs saved before they existed still load):
  resolution          the stage's output side in pixels.
  lowres_resolution   0 (default): a base stage, records hold "image". > 0: a super-resolution stage
                      whose input is this side; it must be smaller than and divide `resolution`, and
                      records hold "image" [R, R, 3] and "lowres" [r, r, 3] (uint8) of the same picture.
  lowres_downsample   "box" | "bilinear" | "bicubic" (default) | "lanczos": the anti-aliased PIL filter
                      that makes "lowres" from a folder image (`resample.downsample`). The shapes dataset
                      renders both resolutions from one scene instead, so it ignores this key.
  crop_resolution     0 (default): train on whole images. > 0 (SR stages only): random crops of this
                      side, aligned to the scale factor, with the matching low-res region
                      (`make_loader(crop_size=...)` does the cropping, so the source is unchanged).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import ml_collections
from etils import epath

from imagen_jax.data.folder import WHITE, FolderSource
from imagen_jax.data.resample import check_int, check_lowres
from imagen_jax.data.shapes_tfds import prepare_shapes
from imagen_jax.errors import ConfigError

DATASETS = ("shapes", "folder")


def check_stage_data(data: ml_collections.ConfigDict) -> None:
    """Raise ConfigError (naming the key and the fix) unless the stage keys above can work together."""
    if data.name not in DATASETS:
        raise ConfigError(f"config.data.name={data.name!r}: use one of {DATASETS}.")
    resolution = data.resolution
    lowres = data.get("lowres_resolution", 0)
    check_lowres(resolution, lowres, data.get("lowres_downsample", "bicubic"))
    crop = data.get("crop_resolution", 0)
    check_int("crop_resolution", crop, minimum=0)
    if not crop:
        return
    if not lowres:
        raise ConfigError(
            f"config.data.crop_resolution={crop} needs a super-resolution stage "
            "(config.data.lowres_resolution > 0); set crop_resolution=0 for a base stage."
        )
    if crop > resolution:
        raise ConfigError(
            f"config.data.crop_resolution={crop} exceeds config.data.resolution={resolution}: use at most "
            f"{resolution}, or 0 to train on whole images."
        )
    scale = resolution // lowres
    if crop % scale:
        raise ConfigError(
            f"config.data.crop_resolution={crop} is not divisible by the scale factor {scale} "
            f"(resolution {resolution} / lowres_resolution {lowres}): use a multiple of {scale}, "
            f"e.g. {max(scale, crop - crop % scale)}, so the low-res crop covers whole pixels."
        )


class RenamedSource:
    """A random-access source whose records have some keys renamed (e.g. "image_32" -> "lowres")."""

    def __init__(self, source: object, names: Mapping[str, str]):
        self.source = source
        self.names = dict(names)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> dict[str, object]:
        return self._renamed(self.source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, object]]:
        return [self._renamed(record) for record in self.source.__getitems__(indices)]

    def _renamed(self, record: Mapping[str, object]) -> dict[str, object]:
        return {self.names.get(k, k): v for k, v in record.items()}

    def __repr__(self) -> str:  # grain validates a restored iterator against repr(source): keep it stable
        return f"RenamedSource({self.source!r}, {self.names!r})"


def build_source(data: ml_collections.ConfigDict, workdir: str | os.PathLike, split: str = "train") -> object:
    """The `split` of the dataset named by `data.name` (shapes are generated offline on first use).

    Base stages yield records with one image key; SR stages (data.lowres_resolution > 0) yield "image"
    and "lowres" (see the module docstring).
    """
    check_stage_data(data)
    lowres = data.get("lowres_resolution", 0)
    if data.name == "shapes":
        # One TFDS config per resolution set (its name encodes them), so a base 32 set and an SR (32, 128)
        # set share a data_dir without colliding.
        builder = prepare_shapes(
            data.data_dir or epath.Path(workdir) / "data",
            resolutions=(lowres, data.resolution) if lowres else data.resolution,
            num_train=data.num_train,
            num_eval=data.num_eval,
            seed=data.seed,
            p_two=data.two_object_prob,
            made_up_prob=data.made_up_words.prob,
            made_up_max=data.made_up_words.max_words,
        )
        source = builder.as_data_source(split)
        if not lowres:  # unwrapped: the repr in checkpointed base-stage iterator states stays valid
            return source
        return RenamedSource(source, {f"image_{lowres}": "lowres", f"image_{data.resolution}": "image"})
    if not data.folder:
        raise ConfigError(
            "config.data.name='folder' needs config.data.folder (images + captions.tsv), "
            "e.g. --config.data.folder=/path/to/images"
        )
    # .get: configs saved in older checkpoints lack these keys; FolderSource validates the values.
    return FolderSource(
        data.folder,
        data.resolution,
        background=data.get("background", WHITE),
        aspect_policy=data.get("aspect_policy", "crop"),
        max_aspect=data.get("max_aspect", 2.0),
        lowres_resolution=lowres,
        lowres_downsample=data.get("lowres_downsample", "bicubic"),
    )
