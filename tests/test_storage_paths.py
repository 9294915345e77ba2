"""Storage through one path abstraction (etils epath), so a `gs://` workdir takes the same code as a local
one. No bucket here: these check, on local paths, that each storage function accepts `epath.Path` and str
alike and writes the same files, and that only process 0 writes TensorBoard files, sample grids and the
embedding cache (one test runs a real two-process build)."""

import json
import os
import pickle
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from etils import epath
from PIL import Image

from imagen_jax.data.folder import FolderSource, load_image
from imagen_jax.data.sources import build_source
from imagen_jax.stage import integrity
from imagen_jax.stage.images import save_grid
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.embedding_cache import EmbeddingCache
from imagen_jax.training.progress import MetricWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=384, d_model=32, d_kv=8, d_ff=48, num_heads=4, num_layers=2)
TEXT = dict(encoder="random", tokenizer="byte", max_length=24, dtype="float32", seed=0, t5=TINY)
CAPTIONS = ["a corgi", "sushi house", "a red circle", "", "a blue square"]


@pytest.fixture
def other_process(monkeypatch):
    """Pretends this is process 1 of a multi-host run."""
    monkeypatch.setattr(jax, "process_index", lambda: 1)


@pytest.fixture(scope="module")
def text_encoder():
    return build_text_encoder(ml_collections.ConfigDict(TEXT))


def _fake_checkpoint(step_dir: epath.Path) -> None:
    for rel, data in {
        "_CHECKPOINT_METADATA": b"{}",
        "state/manifest.ocdbt": b"m" * 10,
        "state/ocdbt.process_0/d/aaa": b"zero" * 100,
        "state/ocdbt.process_1/d/bbb": b"one" * 100,
    }.items():
        (step_dir / rel).parent.mkdir(parents=True, exist_ok=True)
        (step_dir / rel).write_bytes(data)


@pytest.mark.parametrize("as_type", [str, epath.Path])
def test_file_manifests_accept_str_and_epath(tmp_path, as_type):
    step_dir = epath.Path(tmp_path) / "7"
    _fake_checkpoint(step_dir)
    path = integrity.write_file_manifest(as_type(step_dir), 0)
    assert path == str(step_dir / "files.process_0.json")
    files = json.loads(epath.Path(path).read_text())["files"]
    # '/'-separated relative paths; process 1's shards are its own manifest's business.
    assert sorted(files) == ["_CHECKPOINT_METADATA", "state/manifest.ocdbt", "state/ocdbt.process_0/d/aaa"]
    assert files["state/ocdbt.process_0/d/aaa"][0] == 400
    integrity.write_file_manifest(as_type(step_dir), 1)
    assert integrity.has_file_manifest(as_type(step_dir))
    assert integrity.check_file_manifests(as_type(step_dir)) is None
    assert not list(step_dir.glob("*.tmp"))

    (step_dir / "state/ocdbt.process_1/d/bbb").write_bytes(b"one" * 99)
    assert integrity.check_file_manifests(as_type(step_dir)) == (
        "state/ocdbt.process_1/d/bbb is 297 bytes, 300 when written (truncated or overwritten)"
    )
    (step_dir / "state/ocdbt.process_1/d/bbb").write_bytes(b"two" * 100)
    assert "changed after it was written" in integrity.check_file_manifests(as_type(step_dir))
    (step_dir / "state/ocdbt.process_1/d/bbb").unlink()
    assert integrity.check_file_manifests(as_type(step_dir)) == "state/ocdbt.process_1/d/bbb is missing"


@pytest.mark.parametrize("as_type", [str, epath.Path])
def test_save_grid_accepts_str_and_epath(tmp_path, as_type):
    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    target = tmp_path / "new" / "dir" / "grid.png"  # folders are created
    png, txt = save_grid(images, ["a", "b", "c"], as_type(target), columns=3, upscale=2)
    assert (png, txt) == (str(target), str(tmp_path / "new" / "dir" / "grid.txt"))
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size == ((3 * 10 + 2) * 2, 12 * 2)
    assert epath.Path(txt).read_text() == "0\ta\n1\tb\n2\tc\n"
    with pytest.raises(ValueError, match="unknown image file extension"):
        save_grid(images, ["a", "b", "c"], as_type(tmp_path / "grid.nope"))


def test_save_grid_writes_only_on_process_0(tmp_path, other_process):
    images = np.zeros((2, 4, 4, 3), np.uint8)
    png, txt = save_grid(images, ["a", "b"], tmp_path / "samples" / "step_1.png")
    assert png.endswith("step_1.png") and txt.endswith("step_1.txt")
    assert not (tmp_path / "samples").exists()


def test_metric_writer_accepts_epath_and_is_a_no_op_on_other_processes(tmp_path, monkeypatch):
    writer = MetricWriter(epath.Path(tmp_path) / "tensorboard")
    writer.scalars(1, {"loss": 0.5})
    writer.text(1, "config", "x")
    writer.close()
    names = [p.name for p in (tmp_path / "tensorboard").iterdir()]
    assert len(names) == 1 and names[0].startswith("events.out.tfevents.")

    monkeypatch.setattr(jax, "process_index", lambda: 1)
    writer = MetricWriter(epath.Path(tmp_path) / "other")
    writer.scalars(1, {"loss": 0.5})
    writer.text(1, "config", "x")
    writer.close()
    assert not (tmp_path / "other").exists()


def test_embedding_cache_accepts_str_and_epath(tmp_path, text_encoder):
    out = epath.Path(tmp_path) / "text_cache"
    built = EmbeddingCache.build(CAPTIONS, text_encoder, out, batch_size=2, dtype="float32", progress=False)
    assert isinstance(built.path, epath.Path)
    assert sorted(p.name for p in out.iterdir()) == [
        "embeddings.array_record", "keys.npy", "lengths.npy", "meta.json"
    ]
    assert not (tmp_path / "text_cache.tmp").exists()
    again = EmbeddingCache.open(str(out))
    np.testing.assert_array_equal(again.keys, built.keys)
    a, ma = again.lookup(CAPTIONS)
    b, mb = built.lookup(CAPTIONS)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(ma, mb)


def test_embedding_cache_only_process_0_writes(tmp_path, text_encoder, monkeypatch):
    out = tmp_path / "text_cache"
    first = EmbeddingCache.build(CAPTIONS, text_encoder, str(out), batch_size=2, dtype="float32",
                                 progress=False)
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()}
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    # Process 1 encodes alongside process 0 but leaves the folder to it, then opens what is there.
    other = EmbeddingCache.build(["only", "process", "zero", "writes"], text_encoder, out, batch_size=2,
                                 dtype="float32", progress=False, overwrite=True)
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.iterdir()} == before
    assert not (tmp_path / "text_cache.tmp").exists()
    np.testing.assert_array_equal(other.keys, first.keys)
    with pytest.raises(FileNotFoundError, match="no embedding cache"):  # nothing written for process 1
        EmbeddingCache.build(CAPTIONS, text_encoder, tmp_path / "never", batch_size=2, progress=False)
    assert not (tmp_path / "never").exists() and not (tmp_path / "never.tmp").exists()


def test_embedding_cache_open_refuses_a_folder_without_records(tmp_path, text_encoder):
    out = tmp_path / "text_cache"
    EmbeddingCache.build(CAPTIONS, text_encoder, out, batch_size=2, progress=False)
    (out / "embeddings.array_record").unlink()  # e.g. an interrupted copy to a bucket
    with pytest.raises(Exception, match="embeddings.array_record is missing"):
        EmbeddingCache.open(out)


def _folder(root: epath.Path) -> None:
    root.mkdir(parents=True)
    for i, colour in enumerate([(255, 0, 0), (0, 255, 0)]):
        Image.new("RGB", (20, 12), colour).save(os.fspath(root / f"{i}.png"))
    (root / "captions.tsv").write_text("0.png\tred\n1.png\tgreen\nmissing.png\tnothing\n")


def test_folder_source_accepts_str_and_epath(tmp_path):
    root = epath.Path(tmp_path) / "images"
    _folder(root)
    by_str, by_path = FolderSource(str(root), 8), FolderSource(root, 8)
    expected = f"FolderSource(root={str(root)!r}, resolution=8, len=2, skipped=1)"
    assert repr(by_str) == repr(by_path) == expected
    for a, b in zip([by_str[0], by_str[1]], [by_path[0], by_path[1]], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["caption"] == b["caption"]
    np.testing.assert_array_equal(by_path[0]["image"][..., 0], 255)
    np.testing.assert_array_equal(load_image(root / "1.png", 8), load_image(str(root / "1.png"), 8))
    copy = pickle.loads(pickle.dumps(by_path))  # grain hands sources to worker processes
    np.testing.assert_array_equal(copy[1]["image"], by_path[1]["image"])

    data = ml_collections.ConfigDict(dict(name="folder", folder=str(root), resolution=8))
    assert len(build_source(data, epath.Path(tmp_path))) == 2


_TWO_PROCESS_BUILD = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
process, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process)
import ml_collections, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
sys.path.insert(0, ROOT)
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.embedding_cache import EmbeddingCache
mesh = Mesh(np.array(jax.devices()), ("data",))  # 4 devices: the batch spans both processes
encoder = build_text_encoder(ml_collections.ConfigDict(TEXT), mesh)
ids = jax.device_put(np.ones((4, 16), np.int32), NamedSharding(mesh, PartitionSpec("data")))
assert not encoder.encode_ids(ids, ids > 0).is_fully_addressable  # so build must gather across processes
cache = EmbeddingCache.build(CAPTIONS, encoder, out, batch_size=4, dtype="float32", mesh=mesh, progress=False)
emb, mask = cache.lookup(CAPTIONS)
np.save(out + f".lookup{process}.npy", emb)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_build_writes_once_and_both_read_it(tmp_path, text_encoder):
    """A real multi-host build (two local processes, gloo): the sharded encoding runs on both, only
    process 0 writes, and both open the finished folder."""
    out = str(tmp_path / "text_cache")
    script = f"ROOT, TEXT, CAPTIONS = {ROOT!r}, {TEXT!r}, {CAPTIONS!r}\n" + _TWO_PROCESS_BUILD
    port = str(_free_port())
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(i), port, out], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
        for i in range(2)
    ]
    logs = []
    for p in procs:
        try:
            logs.append(p.communicate(timeout=300)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    assert [p.returncode for p in procs] == [0, 0], "\n".join(s[-3000:] for s in logs)
    assert sorted(os.listdir(tmp_path)) == ["text_cache", "text_cache.lookup0.npy", "text_cache.lookup1.npy"]
    reference = EmbeddingCache.build(CAPTIONS, text_encoder, tmp_path / "one", batch_size=4, dtype="float32",
                                     progress=False)
    expected, _ = reference.lookup(CAPTIONS)
    for i in range(2):
        np.testing.assert_allclose(np.load(f"{out}.lookup{i}.npy"), expected, atol=1e-5)
