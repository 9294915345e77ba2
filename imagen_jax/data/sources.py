"""`config.data` -> a random-access source for the input pipeline (one place that knows every dataset)."""

from __future__ import annotations

import os

import ml_collections

from imagen_jax.data.folder import WHITE, FolderSource
from imagen_jax.data.shapes_tfds import prepare_shapes
from imagen_jax.errors import ConfigError

DATASETS = ("shapes", "folder")


def build_source(data: ml_collections.ConfigDict, workdir: str, split: str = "train") -> object:
    """The `split` of the dataset named by `data.name` (shapes are generated offline on first use)."""
    if data.name == "shapes":
        builder = prepare_shapes(
            data.data_dir or os.path.join(workdir, "data"),
            resolutions=data.resolution,
            num_train=data.num_train,
            num_eval=data.num_eval,
            seed=data.seed,
            p_two=data.two_object_prob,
        )
        return builder.as_data_source(split)
    if data.name == "folder":
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
        )
    raise ConfigError(f"config.data.name={data.name!r}: use one of {DATASETS}.")
