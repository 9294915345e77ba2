"""Super-resolution stage data: lowres/image pairs from shapes and folders, aligned crops, config checks."""

import importlib.util

import ml_collections
import numpy as np
import pytest
from PIL import Image
from tensorflow_datasets.core import shuffle

from imagen_jax.data.pipeline import AlignedCrop, make_loader
from imagen_jax.data.resample import DOWNSAMPLE_METHODS, downsample
from imagen_jax.data.shapes_tfds import prepare_shapes
from imagen_jax.data.sources import build_source, check_stage_data
from imagen_jax.errors import ConfigError


def _shapes_data(data_dir, resolution=32, lowres=16, crop=0):
    return ml_collections.ConfigDict(
        dict(
            name="shapes",
            data_dir=str(data_dir),
            folder="",
            resolution=resolution,
            lowres_resolution=lowres,
            lowres_downsample="bicubic",
            crop_resolution=crop,
            num_train=16,
            num_eval=4,
            seed=0,
            two_object_prob=0.5,
            made_up_words=ml_collections.ConfigDict(dict(prob=0.0, max_words=2)),
        )
    )


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def sr_source(shapes_dir):
    return build_source(_shapes_data(shapes_dir), "unused", "train")


def _check_batch(batch, b, hi, lo):
    assert batch["image"].shape == (b, hi, hi, 3) and batch["lowres"].shape == (b, lo, lo, 3)
    for key in ("image", "lowres"):
        assert batch[key].dtype == np.float32
        assert batch[key].min() >= -1.0 and batch[key].max() <= 1.0
    assert batch["caption"].shape == (b,) and isinstance(batch["caption"][0], str)


def test_shapes_sr_batches_and_base_batches_unchanged(shapes_dir, sr_source):
    _check_batch(next(iter(make_loader(sr_source, batch_size=8, seed=0))), 8, 32, 16)
    # A base stage in the same data_dir gets its own TFDS config (names encode the resolutions).
    base = build_source(_shapes_data(shapes_dir, resolution=16, lowres=0), "unused", "train")
    batch = next(iter(make_loader(base, batch_size=8, seed=0)))
    assert set(batch) == {"image", "caption", "scene"} and batch["image"].shape == (8, 16, 16, 3)
    assert sorted(p.name for p in (shapes_dir / "imagen_shapes").glob("r*")) == [
        "r16_32_n16_e4_s0_p50",
        "r16_n16_e4_s0_p50",
    ]


def test_shapes_pairs_are_renders_of_one_scene(sr_source):
    errors, shifted = [], []
    for i in range(len(sr_source)):
        record = sr_source[i]
        assert set(record) == {"image", "lowres", "caption", "scene"}
        # Box-downsampling the high-res render averages its coverage: it should match the low-res render.
        small = downsample(record["image"], 16, "box").astype(np.float32)
        errors.append(np.abs(small - record["lowres"]).mean())
        shifted.append(np.abs(small - sr_source[(i + 1) % len(sr_source)]["lowres"]).mean())
    assert max(errors) < 4.0 and min(shifted) > 4 * max(errors)


def _write_folder(root, n=6):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (40, 50 + 4 * i, 3), dtype=np.uint8)).save(root / f"im{i}.png")
        lines.append(f"im{i}.png\tnoise {i}")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")


def test_folder_lowres_is_downsample_of_the_image(tmp_path):
    _write_folder(tmp_path)
    data = _shapes_data("", resolution=32, lowres=8)
    data.name, data.folder, data.lowres_downsample = "folder", str(tmp_path), "lanczos"
    src = build_source(data, str(tmp_path))
    for i in range(len(src)):
        record = src[i]
        assert record["image"].shape == (32, 32, 3) and record["lowres"].shape == (8, 8, 3)
        np.testing.assert_array_equal(record["lowres"], downsample(record["image"], 8, "lanczos"))
    assert "lowres=8 (lanczos)" in repr(src)
    _check_batch(next(iter(make_loader(src, batch_size=4, seed=0))), 4, 32, 8)
    data.lowres_resolution = 0  # base stage: no lowres key
    assert set(build_source(data, str(tmp_path))[0]) == {"image", "caption"}


def test_downsample_filters_are_anti_aliased():
    # A 1-pixel checkerboard: point sampling would give pure black or white; every filter averages to grey.
    board = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    board = np.repeat(board[..., None], 3, axis=-1)
    for method in DOWNSAMPLE_METHODS:
        small = downsample(board, 8, method)
        assert small.shape == (8, 8, 3) and small.dtype == np.uint8
        assert np.abs(small[1:-1, 1:-1].astype(int) - 127).max() < 20, method
    with pytest.raises(ValueError, match="use one of"):
        downsample(board, 8, "nearest")
    with pytest.raises(ValueError, match="must be in 1..32"):
        downsample(board, 64)


class _NoiseSource:
    """Random noise records (every aligned region is unique), lowres made the way the folder source does."""

    def __init__(self, n=16, hi=32, lo=8):
        rng = np.random.default_rng(1)
        self.records = []
        for i in range(n):
            image = rng.integers(0, 256, (hi, hi, 3), dtype=np.uint8)
            self.records.append({"image": image, "lowres": downsample(image, lo), "caption": f"r{i}"})

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return self.records[index]

    def __repr__(self):
        return "_NoiseSource"


def _to_uint8(x):
    return np.rint((x + 1) * 127.5).astype(np.uint8)


def _crop_offsets(source, batches, crop, scale):
    """Low-res corner of every cropped example, checking both crops against the full record."""
    low = crop // scale
    offsets = []
    for batch in batches:
        for caption, image, lowres in zip(batch["caption"], batch["image"], batch["lowres"], strict=True):
            full = source[int(caption[1:])]
            lowres = _to_uint8(lowres)
            side = full["lowres"].shape[0] - low + 1
            hits = [
                (y, x)
                for y in range(side)
                for x in range(side)
                if np.array_equal(full["lowres"][y : y + low, x : x + low], lowres)
            ]
            assert len(hits) == 1, hits  # the low-res crop is exactly one aligned region of the full lowres
            y, x = hits[0]
            expected = full["image"][y * scale : (y + low) * scale, x * scale : (x + low) * scale]
            np.testing.assert_array_equal(_to_uint8(image), expected)  # ... and the image crop matches it
            offsets.append((y, x))
    return offsets


def test_crops_are_aligned_varied_reproducible_and_resume():
    source = _NoiseSource()

    def batches(seed, n=4):
        it = iter(make_loader(source, batch_size=4, seed=seed, crop_size=16))
        return [next(it) for _ in range(n)]

    first = batches(0)
    _check_batch(first[0], 4, 16, 4)
    offsets = _crop_offsets(source, first, crop=16, scale=4)
    assert len(set(offsets)) > 4  # 25 possible corners; crops differ across examples
    again = _crop_offsets(source, batches(0), crop=16, scale=4)
    assert again == offsets
    assert _crop_offsets(source, batches(1), crop=16, scale=4) != offsets

    # A restored iterator (its state is what training checkpoints) continues with the same crops.
    it = iter(make_loader(source, batch_size=4, seed=0, crop_size=16))
    next(it)
    state = it.get_state()
    resumed = iter(make_loader(source, batch_size=4, seed=0, crop_size=16))
    resumed.set_state(state)
    for expected in first[1:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["image"], expected["image"])
        np.testing.assert_array_equal(got["lowres"], expected["lowres"])


def test_crops_from_built_shapes_source(shapes_dir, sr_source):
    batch = next(iter(make_loader(sr_source, batch_size=8, seed=0, crop_size=8)))
    _check_batch(batch, 8, 8, 4)
    base = build_source(_shapes_data(shapes_dir, resolution=16, lowres=0), "unused", "train")
    with pytest.raises(ValueError, match="needs records with 'image' and 'lowres'"):
        next(iter(make_loader(base, batch_size=4, seed=0, crop_size=8)))


def test_aligned_crop_rejects_a_crop_that_does_not_fit():
    record = _NoiseSource(n=1).records[0]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="multiple of the scale 4"):
        AlignedCrop(6).random_map(record, rng)
    with pytest.raises(ValueError, match="at most the image side"):
        AlignedCrop(64).random_map(record, rng)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(lowres_resolution=48), "lowres_resolution=48 must be smaller than and divide.*32 or 64"),
        (dict(lowres_resolution=128), "lowres_resolution=128 must be smaller than"),
        (dict(lowres_resolution=-32), "lowres_resolution=-32: expected 0 .off. or a positive int"),
        (dict(resolution=-128), "resolution=-128: expected an int >= 1"),
        (dict(crop_resolution=-64), "crop_resolution=-64: expected 0 .off. or a positive int"),
        (dict(lowres_downsample="nearest"), "lowres_downsample='nearest': use one of .'box', 'bilinear'"),
        (dict(lowres_resolution=0, crop_resolution=64), "crop_resolution=64 needs a super-resolution stage"),
        (dict(crop_resolution=62), "crop_resolution=62 is not divisible by the scale factor 4.*e.g. 60"),
        (dict(crop_resolution=256), "crop_resolution=256 exceeds config.data.resolution=128"),
    ],
)
def test_check_stage_data_errors(change, message):
    data = _shapes_data("", resolution=128, lowres=32, crop=64)
    check_stage_data(data)
    data.update(change)
    with pytest.raises(ConfigError, match=message):
        check_stage_data(data)
    with pytest.raises(ConfigError, match=message):  # build_source checks before preparing any data
        build_source(data, "unused")


def test_check_stage_data_accepts_old_configs_and_base_stages():
    check_stage_data(ml_collections.ConfigDict({"name": "shapes", "resolution": 32}))
    check_stage_data(_shapes_data("", resolution=32, lowres=0))
    check_stage_data(_shapes_data("", resolution=256, lowres=64, crop=64))


def test_prepare_names_the_tensorflow_spill(tmp_path, monkeypatch):
    # Past 1000 MiB in a split TFDS spills through tf.io.gfile; images are zlib-compressed to stay below.
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("tensorflow is installed: TFDS can spill")
    monkeypatch.setattr(shuffle, "MAX_MEM_BUFFER_SIZE", 1000)
    with pytest.raises(ConfigError, match="needed TensorFlow.*Lower config.data.num_train"):
        prepare_shapes(str(tmp_path), resolutions=(8, 16), num_train=16, num_eval=4)
