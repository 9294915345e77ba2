"""FolderSource edge cases: bad caption encodings, transparency, extreme aspect ratios, the build report."""

import logging

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import shapes as shapes_config
from imagen_jax.data.folder import FolderSource, check_folder_options
from imagen_jax.data.pipeline import read_text_columns
from imagen_jax.data.sources import RenamedSource, build_source
from imagen_jax.errors import ConfigError, DataError, UserError

BG = (10, 20, 30)


def _rgb(root, name, size=(16, 16), colour=(200, 100, 50)):
    Image.new("RGB", size, colour).save(root / name)


def _tsv(root, *names):
    (root / "captions.tsv").write_text("".join(f"{n}\tcaption of {n}\n" for n in names))


def _wide(root, name="wide.png"):
    """64x16 (4:1): red | green (the middle 16 columns) | blue."""
    a = np.zeros((16, 64, 3), np.uint8)
    a[:, :24] = (255, 0, 0)
    a[:, 24:40] = (0, 255, 0)
    a[:, 40:] = (0, 0, 255)
    Image.fromarray(a).save(root / name)


# --- caption files ---------------------------------------------------------------------------------


def test_non_utf8_tsv_line_names_file_and_line(tmp_path):
    _rgb(tmp_path, "a.png")
    (tmp_path / "captions.tsv").write_bytes(b"a.png\tfine\na.png\tcaf\xe9 au lait\n")
    with pytest.raises(DataError, match=r"captions\.tsv:2: not valid UTF-8.*re-save the file as UTF-8") as e:
        FolderSource(tmp_path, 16)
    assert isinstance(e.value, ValueError) and isinstance(e.value, UserError)
    assert not isinstance(e.value, UnicodeDecodeError)


def test_non_utf8_jsonl_line_names_file_and_line(tmp_path):
    _rgb(tmp_path, "a.png")
    good = b'{"file": "a.png", "caption": "ok"}\n'
    (tmp_path / "captions.jsonl").write_bytes(good + b"\n" + b'{"file": "a.png", "caption": "\xff\xfe"}\n')
    with pytest.raises(DataError, match=r"captions\.jsonl:3: not valid UTF-8 \(byte 0xff"):
        FolderSource(tmp_path, 16)


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    _rgb(tmp_path, "a.png")
    (tmp_path / "captions.tsv").write_bytes("\ufeffa.png\tcafé\r\n".encode())
    src = FolderSource(tmp_path, 16)
    assert src[0]["caption"] == "café" and src.report.listed == 1


@pytest.mark.parametrize(
    "name, content, line",
    [
        ("captions.tsv", "a.png\tok\nno tab here\n", 2),
        ("captions.jsonl", '{"file": "a.png", "caption": "ok"}\n[1, 2]\n', 2),
        ("captions.jsonl", '{"file": "a.png"}\n', 1),
        ("captions.jsonl", '{"file": 3, "caption": "x"}\n', 1),
        ("captions.jsonl", "{not json\n", 1),
    ],
)
def test_malformed_caption_lines_raise_data_error(tmp_path, name, content, line):
    _rgb(tmp_path, "a.png")
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=rf"{name.replace('.', '[.]')}:{line}: expected"):
        FolderSource(tmp_path, 16)


def test_missing_folder_and_captions_are_file_not_found_user_errors(tmp_path):
    for root in (tmp_path / "nope", tmp_path):
        with pytest.raises(FileNotFoundError) as e:
            FolderSource(root, 16)
        assert isinstance(e.value, UserError)  # one line from the command-line tools


def test_no_usable_images_is_data_error(tmp_path):
    _tsv(tmp_path, "missing.png")
    with pytest.raises(DataError, match="no usable images"):
        FolderSource(tmp_path, 16)


# --- transparency ----------------------------------------------------------------------------------


def test_rgba_is_composited_on_background(tmp_path):
    a = np.zeros((16, 16, 4), np.uint8)
    a[:8, :8] = (255, 0, 0, 0)  # fully transparent red: must become the background
    a[:8, 8:] = (0, 0, 255, 255)  # opaque blue: unchanged
    a[8:] = (0, 255, 0, 128)  # half-transparent green: blended
    Image.fromarray(a, "RGBA").save(tmp_path / "t.png")
    Image.new("RGBA", (16, 16), (1, 2, 3, 255)).save(tmp_path / "opaque.png")  # alpha, all opaque
    _tsv(tmp_path, "t.png", "opaque.png")
    src = FolderSource(tmp_path, 16, background=BG)
    img = src[0]["image"].astype(int)
    assert img.shape == (16, 16, 3)
    np.testing.assert_array_equal(img[2, 2], BG)
    np.testing.assert_array_equal(img[2, 13], (0, 0, 255))
    blend = [round(c * 128 / 255 + b * 127 / 255) for c, b in zip((0, 255, 0), BG, strict=True)]
    np.testing.assert_allclose(img[12, 8], blend, atol=1)
    np.testing.assert_array_equal(src[1]["image"][5, 5], (1, 2, 3))
    assert src.report.composited == 1


def test_la_and_palette_transparency_are_composited(tmp_path):
    la = np.zeros((16, 16, 2), np.uint8)
    la[:, :8] = (255, 0)  # transparent white
    la[:, 8:] = (50, 255)  # opaque grey
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    p = Image.new("P", (16, 16), 0)
    p.putpalette([255, 0, 255, 0, 0, 0] + [0] * 762)
    p.paste(1, (0, 8, 16, 16))  # bottom half: index 1 (black, opaque); top: index 0 (transparent magenta)
    p.save(tmp_path / "p.png", transparency=0)
    _tsv(tmp_path, "la.png", "p.png")
    src = FolderSource(tmp_path, 16, background=BG)
    la_img, p_img = src[0]["image"], src[1]["image"]
    np.testing.assert_array_equal(la_img[4, 2], BG)
    np.testing.assert_array_equal(la_img[4, 13], (50, 50, 50))
    np.testing.assert_array_equal(p_img[2, 4], BG)
    np.testing.assert_array_equal(p_img[13, 4], (0, 0, 0))
    assert src.report.composited == 2


# --- aspect ratio ----------------------------------------------------------------------------------


def test_wide_image_crop_policy_keeps_the_centre(tmp_path):
    _wide(tmp_path)
    _rgb(tmp_path, "ok.png", size=(24, 16))  # 1.5:1, within max_aspect: cropped, not counted
    _tsv(tmp_path, "wide.png", "ok.png")
    src = FolderSource(tmp_path, 16, aspect_policy="crop", max_aspect=2.0)
    img = src[0]["image"]
    assert img.shape == (16, 16, 3) and len(src) == 2
    np.testing.assert_array_equal(img[8, 8], (0, 255, 0))
    assert (src.report.aspect_cropped, src.report.aspect_padded, src.report.aspect_skipped) == (1, 0, 0)


def test_wide_image_pad_policy_letterboxes_on_background(tmp_path):
    _wide(tmp_path)
    _rgb(tmp_path, "ok.png", size=(24, 16), colour=(200, 100, 50))
    _tsv(tmp_path, "wide.png", "ok.png")
    src = FolderSource(tmp_path, 16, background=BG, aspect_policy="pad", max_aspect=2.0)
    img = src[0]["image"].astype(int)
    assert img.shape == (16, 16, 3)
    # 64x16 -> 16x4 at rows 6..9; background bars above and below, the whole width kept.
    assert (img[:6] == BG).all() and (img[10:] == BG).all()
    assert img[7, 1, 0] > 200 and img[7, 8, 1] > 200 and img[7, 14, 2] > 200
    ok = src[1]["image"]  # within max_aspect: centre-cropped as before, no bars
    assert (ok == (200, 100, 50)).all()
    assert (src.report.aspect_cropped, src.report.aspect_padded, src.report.aspect_skipped) == (0, 1, 0)


def test_wide_image_skip_policy_drops_it(tmp_path):
    _wide(tmp_path)
    _rgb(tmp_path, "ok.png", size=(32, 16))  # exactly 2:1 is within max_aspect
    _tsv(tmp_path, "wide.png", "ok.png")
    src = FolderSource(tmp_path, 16, aspect_policy="skip", max_aspect=2.0)
    assert len(src) == 1 and src[0]["caption"] == "caption of ok.png"
    assert src.report.aspect_skipped == 1 and src.report.used == 1 and src.report.listed == 2
    src = FolderSource(tmp_path, 16, aspect_policy="skip", max_aspect=5.0)  # 4:1 now within
    assert len(src) == 2 and src.report.aspect_skipped == 0


# --- report and summary ----------------------------------------------------------------------------


def test_report_counts_and_logged_summary(tmp_path, caplog):
    _wide(tmp_path)
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    _rgb(tmp_path, "plain.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    missing = [f"gone{i}.png" for i in range(24)]
    _tsv(tmp_path, "wide.png", "clear.png", "plain.png", "bad.png", *missing)
    with caplog.at_level(logging.INFO):
        src = FolderSource(tmp_path, 16, aspect_policy="pad")
    r = src.report
    assert (r.listed, r.used, len(r.unreadable), r.composited) == (28, 3, 25, 1)
    assert (r.aspect_cropped, r.aspect_padded, r.aspect_skipped) == (0, 1, 0)
    assert src.skipped == 25 and "bad.png (UnidentifiedImageError)" in src.skipped_files
    [record] = [rec for rec in caplog.records if "FolderSource" in rec.getMessage()]
    msg = record.getMessage()
    assert record.levelno == logging.WARNING
    assert "28 image(s) listed, 3 used" in msg and "skipped as unreadable: 25" in msg
    assert "bad.png" in msg and "(5 more)" in msg and "gone23.png" not in msg  # names capped at 20
    assert "for transparency: 1" in msg and "0 cropped, 1 padded, 0 skipped" in msg


def test_clean_folder_logs_info_not_warning(tmp_path, caplog):
    _rgb(tmp_path, "a.png")
    _tsv(tmp_path, "a.png")
    with caplog.at_level(logging.INFO):
        src = FolderSource(tmp_path, 16)
    assert src.report.used == 1 and src.report.unreadable == ()
    levels = [rec.levelno for rec in caplog.records if "FolderSource" in rec.getMessage()]
    assert levels == [logging.INFO]
    np.testing.assert_array_equal(src[0]["image"], src[0]["image"])  # deterministic reads


# --- config ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, key",
    [
        (dict(background=(255, 255)), "background"),
        (dict(background=(256, 0, 0)), "background"),
        (dict(background=(-1, 0, 0)), "background"),
        (dict(background=(1.0, 2, 3)), "background"),
        (dict(background="white"), "background"),
        (dict(aspect_policy="stretch"), "aspect_policy"),
        (dict(max_aspect=0.5), "max_aspect"),
        (dict(max_aspect=float("nan")), "max_aspect"),
        (dict(max_aspect="2"), "max_aspect"),
    ],
)
def test_bad_folder_options_are_config_errors(tmp_path, kwargs, key):
    _rgb(tmp_path, "a.png")
    _tsv(tmp_path, "a.png")
    with pytest.raises(ConfigError, match=rf"config\.data\.{key}="):
        FolderSource(tmp_path, 16, **kwargs)


def test_default_config_keys_are_valid():
    data = shapes_config.get_config().data
    assert tuple(data.background) == (255, 255, 255)
    assert (data.aspect_policy, data.max_aspect) == ("crop", 2.0)
    assert check_folder_options(data.background, data.aspect_policy, data.max_aspect) == (255, 255, 255)
    assert check_folder_options([0, 0, 0], "pad", 1) == (0, 0, 0)  # JSON round trip gives lists


def test_build_source_passes_folder_options_and_rejects_bad_config(tmp_path):
    _wide(tmp_path)
    _rgb(tmp_path, "ok.png")
    _tsv(tmp_path, "wide.png", "ok.png")
    data = shapes_config.get_config().data
    data.name, data.folder, data.resolution = "folder", str(tmp_path), 16
    data.aspect_policy, data.background = "pad", BG
    src = build_source(data, str(tmp_path))
    assert src.report.aspect_padded == 1 and (src[0]["image"][0] == BG).all()
    data.aspect_policy = "squash"
    with pytest.raises(ConfigError, match="aspect_policy='squash'"):
        build_source(data, str(tmp_path))
    data.folder = ""
    with pytest.raises(ConfigError, match="needs config.data.folder"):
        build_source(data, str(tmp_path))
    with pytest.raises(ConfigError, match="use one of"):
        build_source(ml_collections.ConfigDict({"name": "imagenet"}), str(tmp_path))
    # Configs saved before these keys existed still build, with the defaults.
    old = ml_collections.ConfigDict({"name": "folder", "folder": str(tmp_path), "resolution": 16})
    assert build_source(old, str(tmp_path)).report.aspect_cropped == 1


# --- text columns ----------------------------------------------------------------------------------


class _Records:
    """A random-access source that counts how it is read; `batched` adds `__getitems__`."""

    def __init__(self, records, batched):
        self.records, self.single, self.many = records, 0, 0
        if batched:
            self.__getitems__ = self._getitems

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        self.single += 1
        return self.records[index]

    def _getitems(self, indices):
        self.many += 1
        return [self.records[i] for i in indices]


def test_text_columns_are_read_in_chunks_and_a_folder_loads_no_image(tmp_path, monkeypatch):
    records = [{"caption": f"c{i}".encode(), "scene": f"s{i}", "image": None} for i in range(10)]
    want = {"caption": [f"c{i}" for i in range(10)], "scene": [f"s{i}" for i in range(10)]}
    for batched in (True, False):
        source = _Records(records, batched)
        assert read_text_columns(source, ("caption", "scene"), chunk=4) == want
        assert (source.many, source.single) == ((3, 0) if batched else (0, 10))
    # The shapes SR stage's renamed TFDS source keeps its batched reads.
    renamed = RenamedSource(_Records(records, True), {"scene": "layout"})
    assert read_text_columns(renamed, ("layout",), chunk=4) == {"layout": want["scene"]}
    assert renamed.source.many == 3 and renamed.source.single == 0
    with pytest.raises(DataError, match=r"records have no 'tags' \(only \['caption', 'image', 'scene'\]\)"):
        read_text_columns(records, ("caption", "tags"))
    _rgb(tmp_path, "a.png")
    _rgb(tmp_path, "b.png")
    _tsv(tmp_path, "a.png", "b.png")
    folder = FolderSource(tmp_path, 8)

    def no_image(*args, **kwargs):
        raise AssertionError("read an image for its caption")

    monkeypatch.setattr("imagen_jax.data.folder.load_image", no_image)
    assert read_text_columns(folder, ("caption",)) == {"caption": ["caption of a.png", "caption of b.png"]}
    with pytest.raises(DataError, match=r"a folder's records have no \['scene'\]"):
        read_text_columns(folder, ("caption", "scene"))
