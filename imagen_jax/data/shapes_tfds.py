"""TFDS builder "imagen_shapes": the procedural shapes dataset, generated offline into ArrayRecord files.

Runs without TensorFlow (see TRAPS): images are `tfds.features.Tensor` uint8 (no PNG encoding, which
needs TensorFlow), text is `Text`, and `DatasetInfo` is built directly. Each config stores one image key
per resolution, `image_<r>`, all rendered from the same scene, so a config like `r32_128` serves the
super-resolution stage with exact low/high pairs. Read back with `builder.as_data_source(split)`.

Images are zlib-compressed (numpy-only in TFDS both ways): flat shapes on black shrink ~80x (a 128x128
image from 48 KiB to ~0.6 KiB). Besides disk, this matters because TFDS holds a split in memory while
writing it and spills to temporary files through `tf.io.gfile` past 1000 MiB, which fails without
TensorFlow: raw, 20k (32, 128) pairs already crossed it. `prepare_shapes` names that failure.

Build with `prepare_shapes(data_dir, resolutions=32, num_train=50_000, num_eval=1_000)` (offline,
idempotent). The `tfds build` command line itself imports TensorFlow (tfds 4.9.10 CLI), so it is not
usable in this TensorFlow-free setup; with TensorFlow installed,
`tfds build imagen_jax/data/shapes_tfds.py --config r32` builds the named configs.

`data_dir` may be a `gs://` URL for reading (array_record's reader opens `gs://` itself; TFDS reaches the
metadata through `etils.epath`, which needs `gcsfs` or TensorFlow), but generating needs a local folder:
array_record's writer writes only local files. Generate into a local `data_dir` and copy the
`imagen_shapes` folder to the bucket, or keep `config.data.data_dir` local.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence

import jax
import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from jax.experimental import multihost_utils

from imagen_jax.data import shapes
from imagen_jax.errors import ConfigError


@dataclasses.dataclass(eq=False)  # BuilderConfig is a plain dataclass; keep its eq/hash
class ShapesConfig(tfds.core.BuilderConfig):
    """Resolutions to render per example, split sizes, generation seed and two-object probability."""

    resolutions: tuple[int, ...] = (32,)
    num_train: int = 50_000
    num_validation: int = 1_000
    num_test: int = 1_000
    seed: int = 0
    p_two: float = 0.5
    made_up_prob: float = 0.0
    made_up_max: int = 2


class ImagenShapes(tfds.core.GeneratorBasedBuilder):
    """Procedural shapes scenes with captions and the scene as JSON (for the scorer)."""

    VERSION = tfds.core.Version("1.2.0")
    RELEASE_NOTES = {
        "1.0.0": "First version.",
        "1.1.0": "Images zlib-compressed (same pixels).",
        "1.2.0": "Captions from 16 one-object and 10 two-object framings (was 6 and 4).",
    }
    BUILDER_CONFIGS = [
        ShapesConfig(name="r32", description="32x32 images for the base model.", resolutions=(32,)),
        ShapesConfig(
            name="r32_64",
            description="32 and 64 pairs for a small SR stage.",
            resolutions=(32, 64),
            num_train=20_000,
        ),
        ShapesConfig(
            name="r64_256",
            description="64 and 256 pairs for the 64->256 SR stage.",
            resolutions=(64, 256),
            num_train=5_000,
            num_validation=200,
            num_test=200,
        ),
    ]
    DEFAULT_BUILDER_CONFIG_NAME = "r32"
    # TFDS finds its module through etils' resource lookup, which imports the optional
    # `importlib_resources` package for modules inside a package; pointing at this file skips that.
    code_path = epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        cfg = self.builder_config
        features = {
            f"image_{r}": tfds.features.Tensor(shape=(r, r, 3), dtype=np.uint8, encoding="zlib")
            for r in cfg.resolutions
        }
        features["caption"] = tfds.features.Text()
        features["scene"] = tfds.features.Text()
        return tfds.core.DatasetInfo(
            builder=self,
            description="Procedural coloured shapes with captions (imagen_jax demo data).",
            features=tfds.features.FeaturesDict(features),
            supervised_keys=None,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        del dl_manager  # nothing to download: every example is generated from its (seed, split, index)
        cfg = self.builder_config
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items() if n > 0}

    def _generate_examples(self, split: str, num: int) -> Iterator[tuple[int, dict]]:
        cfg = self.builder_config
        for i in range(num):
            ex = shapes.make_example(cfg.seed, split, i, cfg.resolutions, p_two=cfg.p_two,
                                     made_up_prob=cfg.made_up_prob, made_up_max=cfg.made_up_max)
            ex.pop("image")  # stored only under image_<r>
            yield i, ex


def config_for(
    resolutions: int | Sequence[int],
    *,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    p_two: float = 0.5,
    made_up_prob: float = 0.0,
    made_up_max: int = 2,
) -> ShapesConfig:
    """A config whose name encodes every setting, so different settings never share files."""
    res = (resolutions,) if isinstance(resolutions, int) else tuple(int(r) for r in resolutions)
    name = f"r{'_'.join(map(str, res))}_n{num_train}_e{num_eval}_s{seed}_p{int(round(p_two * 100))}"
    if made_up_prob > 0:  # unchanged otherwise: the captions are those of before
        name += f"_m{int(round(made_up_prob * 100))}x{made_up_max}"
    return ShapesConfig(
        name=name,
        resolutions=res,
        num_train=num_train,
        num_validation=num_eval,
        num_test=num_eval,
        seed=seed,
        p_two=p_two,
        made_up_prob=made_up_prob,
        made_up_max=made_up_max,
    )


def prepare_shapes(
    data_dir: str | os.PathLike,
    *,
    resolutions: int | Sequence[int] = 32,
    num_train: int = 50_000,
    num_eval: int = 1_000,
    seed: int = 0,
    p_two: float = 0.5,
    made_up_prob: float = 0.0,
    made_up_max: int = 2,
) -> ImagenShapes:
    """Builder for these settings under `data_dir`, generating the files first if they are missing."""
    cfg = config_for(resolutions, num_train=num_train, num_eval=num_eval, seed=seed, p_two=p_two,
                     made_up_prob=made_up_prob, made_up_max=made_up_max)
    builder = ImagenShapes(config=cfg, data_dir=data_dir, file_format="array_record")
    if "://" in os.fspath(data_dir) and not builder.is_prepared():
        raise ConfigError(
            f"the shapes dataset {cfg.name} is not in {data_dir}, and it can only be generated into a local "
            "folder (array_record writes local files only). Set config.data.data_dir to a local folder, "
            f"or generate it locally (prepare_shapes) and copy the imagen_shapes folder to {data_dir}."
        )
    if jax.process_count() == 1:
        _generate(builder)
        return builder
    # Several processes: process 0 first, so on a folder they share the others find it ready instead of
    # writing the same files at once; on per-host folders each then generates its own copy.
    if jax.process_index() == 0:
        _generate(builder)
    multihost_utils.sync_global_devices(f"imagen_jax: shapes dataset {cfg.name} on process 0")
    if jax.process_index() != 0:
        _generate(builder)
    return builder


def _generate(builder: ImagenShapes) -> None:
    cfg = builder.builder_config
    mode = tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    except ModuleNotFoundError as e:
        if e.name != "tensorflow":
            raise
        raise ConfigError(
            f"generating the shapes dataset {cfg.name} needed TensorFlow, which is not installed: TFDS "
            "spills a split over 1000 MiB serialized to temporary files through tf.io.gfile. Lower "
            "config.data.num_train or the resolution (or install tensorflow)."
        ) from None
