"""Shapes TFDS builder prepared offline, folder loader, and the grain pipeline reading both."""

import logging

import numpy as np
import pytest
from PIL import Image

from imagen_jax.data import shapes
from imagen_jax.data.folder import FolderSource
from imagen_jax.data.pipeline import make_loader, measure_throughput
from imagen_jax.data.shapes_tfds import prepare_shapes


def _tokenize(captions):
    """Byte-level stand-in tokenizer: ids [B, 16] and mask."""
    ids = np.zeros((len(captions), 16), np.int32)
    for i, c in enumerate(captions):
        b = list(c.encode())[:16]
        ids[i, : len(b)] = np.asarray(b) + 3
    return {"text_ids": ids, "text_mask": ids > 0}


@pytest.fixture(scope="module")
def builder(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("tfds")
    return prepare_shapes(str(data_dir), resolutions=(32, 64), num_train=96, num_eval=16, seed=3)


def test_tfds_prepare_offline_and_read_back(builder):
    assert builder.info.splits["train"].num_examples == 96
    assert builder.info.splits["validation"].num_examples == 16
    src = builder.as_data_source("train")
    record = src[0]
    assert set(record) == {"image_32", "image_64", "caption", "scene"}
    scene = shapes.Scene.from_json(record["scene"])
    # Stored bytes are exactly the renders of the stored scene (low/high pair from one scene).
    np.testing.assert_array_equal(record["image_32"], shapes.render(scene, 32))
    np.testing.assert_array_equal(record["image_64"], shapes.render(scene, 64))


def test_prepare_is_reused(builder, tmp_path):
    again = prepare_shapes(builder.data_dir.split("/imagen_shapes")[0], resolutions=(32, 64), num_train=96,
                           num_eval=16, seed=3)
    assert again.info.splits["train"].num_examples == 96


def test_loader_batches_from_tfds(builder):
    src = builder.as_data_source("train")
    loader = make_loader(src, batch_size=16, seed=0, tokenize_fn=_tokenize,
                         image_keys={"image_32": "image", "image_64": "image_64"})
    batch = next(iter(loader))
    assert batch["image"].shape == (16, 32, 32, 3) and batch["image"].dtype == np.float32
    assert batch["image_64"].shape == (16, 64, 64, 3)
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["image"].min() == -1.0  # black background maps to -1
    assert isinstance(batch["caption"][0], str) and batch["caption"].shape == (16,)
    assert batch["text_ids"].shape == (16, 16) and batch["text_mask"].dtype == bool
    assert isinstance(batch["scene"][0], str)


def test_loader_epochs_shuffle_and_determinism(builder):
    src = builder.as_data_source("validation")

    def captions(seed, shuffle=True):
        loader = make_loader(src, batch_size=4, seed=seed, num_epochs=1, shuffle=shuffle)
        return [c for b in loader for c in b["caption"]]

    first = captions(0)
    assert len(first) == 16 and first == captions(0)
    assert sorted(first) == sorted(captions(1)) and first != captions(1)
    assert sorted(first) == sorted(captions(0, shuffle=False))


def test_loader_shards_by_process(builder, monkeypatch):
    from imagen_jax.data import pipeline

    src = builder.as_data_source("validation")
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="batch_size 3 is not divisible by process_count 2"):
        make_loader(src, batch_size=3, seed=0)
    hosts = []
    for index in (0, 1):  # each "host" gets half the global batch and half the records
        monkeypatch.setattr(pipeline.jax, "process_index", lambda index=index: index)
        batches = list(make_loader(src, batch_size=4, seed=0, num_epochs=1))
        assert all(len(b["caption"]) == 2 for b in batches)
        hosts.append([list(b["scene"]) for b in batches])
    seen = [[s for batch in host for s in batch] for host in hosts]
    assert len(seen[0]) == len(seen[1]) == 8 and not set(seen[0]) & set(seen[1])
    # The hosts' slices, stacked, are exactly the one-process run's global batches, rows in order.
    monkeypatch.setattr(pipeline.jax, "process_count", lambda: 1)
    monkeypatch.setattr(pipeline.jax, "process_index", lambda: 0)
    single = [list(b["scene"]) for b in make_loader(src, batch_size=4, seed=0, num_epochs=1)]
    assert single == [a + b for a, b in zip(*hosts, strict=True)]


def test_single_image_key_is_renamed_and_throughput(builder):
    loader = make_loader(builder.as_data_source("train"), batch_size=32, seed=0)
    batch = next(iter(loader))
    assert "image_32" in batch and "image_64" in batch  # two keys: names kept
    rate = measure_throughput(loader, 4, warmup=1)
    assert rate > 100  # loose: the shared 2-core machine; the real number is in the report


def _write_folder(root, n_good=4, corrupt=True):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n_good):
        size = (40 + 8 * i, 30)
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(root / f"im{i}.png")
        lines.append(f"im{i}.png\tcaption number {i}")
    if corrupt:
        (root / "bad.png").write_bytes(b"not a png at all")
        lines.append("bad.png\ta broken file")
        lines.append("missing.png\ta file that is not there")
    (root / "captions.tsv").write_text("\n".join(lines) + "\n")


def test_folder_source_skips_corrupt_images(tmp_path, caplog):
    _write_folder(tmp_path)
    with caplog.at_level(logging.WARNING):
        src = FolderSource(tmp_path, 16)
    assert len(src) == 4 and src.skipped == 2
    assert "bad.png" in caplog.text and "missing.png" in caplog.text
    item = src[1]
    assert item["image"].shape == (16, 16, 3) and item["image"].dtype == np.uint8
    assert item["caption"] == "caption number 1"
    batch = next(iter(make_loader(src, batch_size=4, seed=0, tokenize_fn=_tokenize)))
    assert batch["image"].shape == (4, 16, 16, 3) and batch["text_ids"].shape == (4, 16)


def test_folder_source_jsonl(tmp_path):
    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "a.jpg")
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "red"}\n')
    src = FolderSource(tmp_path, 8)
    assert src.skipped == 0 and src[0]["caption"] == "red"
    assert abs(int(src[0]["image"][4, 4, 0]) - 255) < 5


def test_folder_source_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist.*captions.tsv"):
        FolderSource(tmp_path / "does-not-exist", 32)
    with pytest.raises(FileNotFoundError, match="no captions file"):
        FolderSource(tmp_path, 32)
