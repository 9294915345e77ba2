"""Real image-caption data from a folder: images plus `captions.tsv` or `captions.jsonl`.

Layout:
  root/captions.tsv     one `filename<TAB>caption` per line, or
  root/captions.jsonl   one {"file": "a.jpg", "caption": "..."} per line
  root/<filename>       images, paths relative to root (sub-folders allowed)

`FolderSource` is a random-access source (len / getitem) that `imagen_jax.data.pipeline.make_loader`
feeds to grain directly. Every listed image is decoded once when the source is built: corrupt, missing
or unreadable ones are dropped, transparent ones are marked for compositing onto `background`, and ones
whose long/short side ratio exceeds `max_aspect` get `aspect_policy` ("crop", "pad" or "skip"). The
counts are in `source.report` and logged once, so training never meets an exception mid-epoch and no
image is silently changed. There is no TFDS route: `tfds.folder_dataset` needs TensorFlow, and the grain
source already gives shuffling, sharding and prefetch.

The root may be local or a `gs://` URL: files are opened through `etils.epath` (which needs `gcsfs`, or
TensorFlow's gfile, for `gs://`) and decoded from the open file. Building decodes every image once, so
over GCS it reads the whole folder once per process.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax.data.resample import check_lowres, downsample
from imagen_jax.errors import ConfigError, DataError, InputFileNotFoundError

log = logging.getLogger("imagen_jax")

CAPTION_FILES = ("captions.tsv", "captions.jsonl")
ASPECT_POLICIES = ("crop", "pad", "skip")
WHITE = (255, 255, 255)
MAX_NAMES_LOGGED = 20  # a folder with thousands of bad files should not flood the log


def _read_captions(path: epath.Path) -> list[tuple[str, str]]:
    pairs = []
    # Bytes line by line: one bad line must name itself, not surface as a bare UnicodeDecodeError.
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            raw = raw.rstrip(b"\r\n")
            try:  # utf-8-sig on line 1 drops the BOM some editors write
                line = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{path}:{line_no}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}: "
                    f"{raw[:80]!r}); re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)."
                ) from None
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                name, sep, caption = line.partition("\t")
                if not sep:
                    raise DataError(f"{path}:{line_no}: expected 'filename<TAB>caption', got {line!r}")
            else:
                try:
                    row = json.loads(line)
                    name, caption = row["file"], row["caption"]
                except (json.JSONDecodeError, KeyError, TypeError, IndexError):
                    name = caption = None
                if not isinstance(name, str) or not isinstance(caption, str):
                    raise DataError(
                        f"{path}:{line_no}: expected a JSON object with string 'file' and 'caption', "
                        f"got {line!r}"
                    )
            pairs.append((name.strip(), caption.strip()))
    return pairs


def check_folder_options(
    background: Sequence[int], aspect_policy: str, max_aspect: float
) -> tuple[int, int, int]:
    """Validate the folder image options (config.data keys); returns the background as an int triple."""
    ok = isinstance(background, Sequence) and not isinstance(background, str) and len(background) == 3
    ok = ok and all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v <= 255 for v in background
    )
    if not ok:
        raise ConfigError(
            f"config.data.background={background!r}: expected an RGB triple of ints in 0..255, "
            "e.g. (255, 255, 255) for white."
        )
    if aspect_policy not in ASPECT_POLICIES:
        raise ConfigError(f"config.data.aspect_policy={aspect_policy!r}: use one of {ASPECT_POLICIES}.")
    if (
        isinstance(max_aspect, bool)
        or not isinstance(max_aspect, int | float)
        or math.isnan(max_aspect)
        or max_aspect < 1.0
    ):
        raise ConfigError(
            f"config.data.max_aspect={max_aspect!r}: expected a number >= 1.0 (long side / short side), "
            "e.g. 2.0; images beyond it get config.data.aspect_policy."
        )
    return tuple(int(v) for v in background)


def _is_transparent(img: Image.Image) -> bool:
    """True if any pixel is not fully opaque (RGBA, LA, PA, or a palette/RGB/L image with a tRNS key)."""
    if img.mode not in ("RGBA", "LA", "PA", "RGBa", "La") and "transparency" not in img.info:
        return False
    return img.convert("RGBA").getchannel("A").getextrema()[0] < 255


def _to_rgb(img: Image.Image, background: tuple[int, int, int], composite: bool) -> Image.Image:
    if not composite:
        return img.convert("RGB")
    # convert("RGB") drops alpha: transparent pixels would train as whatever colour they hide.
    canvas = Image.new("RGBA", img.size, (*background, 255))
    return Image.alpha_composite(canvas, img.convert("RGBA")).convert("RGB")


def load_image(
    path: str | os.PathLike,
    resolution: int,
    *,
    background: Sequence[int] = WHITE,
    composite: bool | None = None,
    pad: bool = False,
) -> np.ndarray:
    """Decode to RGB (transparency composited onto `background`) and fit to uint8 [r, r, 3].

    pad=False: resize the shorter side to `resolution` (bicubic) and center-crop. pad=True: resize the
    longer side to `resolution` and letterbox onto `background`. `composite` None: detect transparency;
    True/False: decided before (FolderSource does it once at build time).
    """
    bg = tuple(int(v) for v in background)
    with epath.Path(path).open("rb") as f, Image.open(f) as img:
        img = _to_rgb(img, bg, _is_transparent(img) if composite is None else composite)
        w, h = img.size
        if pad:
            scale = resolution / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
            canvas = Image.new("RGB", (resolution, resolution), bg)
            canvas.paste(img, ((resolution - nw) // 2, (resolution - nh) // 2))
            return np.asarray(canvas, np.uint8)
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        return np.asarray(img, np.uint8)


@dataclasses.dataclass(frozen=True)
class FolderReport:
    """What building a FolderSource did to the listed images (also logged once)."""

    listed: int
    used: int
    unreadable: tuple[str, ...]  # "name (ErrorType)", every one
    composited: int  # transparent images composited onto the background
    aspect_cropped: int  # beyond max_aspect, centre-cropped (policy "crop")
    aspect_padded: int  # beyond max_aspect, letterboxed (policy "pad")
    aspect_skipped: int  # beyond max_aspect, dropped (policy "skip")

    def summary(self, root: object, background: Sequence[int], policy: str, max_aspect: float) -> str:
        names = ", ".join(self.unreadable[:MAX_NAMES_LOGGED])
        if len(self.unreadable) > MAX_NAMES_LOGGED:
            names += f", ... ({len(self.unreadable) - MAX_NAMES_LOGGED} more)"
        lines = [
            f"FolderSource {root}: {self.listed} image(s) listed, {self.used} used",
            f"  skipped as unreadable: {len(self.unreadable)}" + (f": {names}" if names else ""),
            f"  composited onto background {tuple(background)} for transparency: {self.composited}",
            f"  long/short side > {max_aspect} (aspect_policy={policy!r}): {self.aspect_cropped} cropped, "
            f"{self.aspect_padded} padded, {self.aspect_skipped} skipped",
        ]
        return "\n".join(lines)


class _Item(NamedTuple):
    path: epath.Path
    caption: str
    composite: bool  # decided once at build time, so __getitem__ does no extra pass
    pad: bool


class FolderSource:
    """Random-access image-caption source over a folder; items are {"image": uint8 [R, R, 3], "caption"}.

    For a super-resolution stage (`lowres_resolution` > 0) items also hold "lowres" uint8 [r, r, 3]: the
    same loaded image downsampled with `resample.downsample(image, r, lowres_downsample)`, so the pair
    is exact whatever the file's own size.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        resolution: int,
        *,
        captions_file: str | None = None,
        background: Sequence[int] = WHITE,
        aspect_policy: str = "crop",
        max_aspect: float = 2.0,
        lowres_resolution: int = 0,
        lowres_downsample: str = "bicubic",
    ):
        self.root = epath.Path(root)
        self.resolution = resolution
        self.background = check_folder_options(background, aspect_policy, max_aspect)
        check_lowres(resolution, lowres_resolution, lowres_downsample)
        self.lowres_resolution, self.lowres_downsample = lowres_resolution, lowres_downsample
        self.aspect_policy, self.max_aspect = aspect_policy, max_aspect
        if not self.root.is_dir():
            raise InputFileNotFoundError(
                f"image folder {self.root} does not exist; expected a folder holding images and "
                f"{' or '.join(CAPTION_FILES)}"
            )
        names = [captions_file] if captions_file else list(CAPTION_FILES)
        found = [self.root / n for n in names if (self.root / n).is_file()]
        if not found:
            raise InputFileNotFoundError(
                f"no captions file in {self.root}: expected {' or '.join(names)} "
                '(\'filename<TAB>caption\' lines, or JSON lines {"file": ..., "caption": ...})'
            )
        self.captions_path = found[0]
        self.items: list[_Item] = []
        pairs = _read_captions(self.captions_path)
        bad: list[str] = []
        composited = cropped = padded = aspect_skipped = 0
        for name, caption in pairs:
            path = self.root / name
            try:  # full decode: `Image.verify` misses truncated data in some formats
                with path.open("rb") as f, Image.open(f) as img:
                    img.load()
                    transparent = _is_transparent(img)
                    w, h = img.size
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                bad.append(f"{name} ({type(e).__name__})")
                continue
            wide = max(w, h) / max(1, min(w, h)) > max_aspect
            if wide and aspect_policy == "skip":
                aspect_skipped += 1
                continue
            cropped += wide and aspect_policy == "crop"
            padded += wide and aspect_policy == "pad"
            composited += transparent
            self.items.append(_Item(path, caption, transparent, wide and aspect_policy == "pad"))
        self.report = FolderReport(
            listed=len(pairs),
            used=len(self.items),
            unreadable=tuple(bad),
            composited=composited,
            aspect_cropped=cropped,
            aspect_padded=padded,
            aspect_skipped=aspect_skipped,
        )
        changed = bad or composited or cropped or padded or aspect_skipped
        log.log(
            logging.WARNING if changed else logging.INFO,
            self.report.summary(self.root, self.background, aspect_policy, max_aspect),
        )
        if not self.items:
            raise DataError(
                f"no usable images listed in {self.captions_path} ({len(pairs)} listed, {len(bad)} "
                f"unreadable, {aspect_skipped} skipped for aspect ratio > {max_aspect})"
            )

    @property
    def skipped(self) -> int:
        """Unreadable images dropped at build time."""
        return len(self.report.unreadable)

    @property
    def skipped_files(self) -> list[str]:
        return list(self.report.unreadable)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        item = self.items[index]
        image = load_image(
            item.path, self.resolution, background=self.background, composite=item.composite, pad=item.pad
        )
        if not self.lowres_resolution:
            return {"image": image, "caption": item.caption}
        lowres = downsample(image, self.lowres_resolution, self.lowres_downsample)
        return {"image": image, "lowres": lowres, "caption": item.caption}

    def text_columns(self, keys: Sequence[str]) -> dict[str, list[str]]:
        """The items' captions (the only text field), as `pipeline.read_text_columns` reads them: from
        the captions file, loading no image."""
        if set(keys) - {"caption"}:
            raise DataError(f"a folder's records have no {sorted(set(keys) - {'caption'})} (only 'caption').")
        return {"caption": [item.caption for item in self.items]}

    def __repr__(self) -> str:  # grain checks a restored iterator against it; base-stage form unchanged
        lowres = ""
        if self.lowres_resolution:
            lowres = f"lowres={self.lowres_resolution} ({self.lowres_downsample}), "
        return (
            f"FolderSource(root={str(self.root)!r}, resolution={self.resolution}, {lowres}len={len(self)}, "
            f"skipped={self.skipped})"
        )
