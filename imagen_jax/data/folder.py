"""Real image-caption data from a folder: images plus `captions.tsv` or `captions.jsonl`.

Layout:
  root/captions.tsv     one `filename<TAB>caption` per line, or
  root/captions.jsonl   one {"file": "a.jpg", "caption": "..."} per line
  root/<filename>       images, paths relative to root (sub-folders allowed)

`FolderSource` is a random-access source (len / getitem) that `imagen_jax.data.pipeline.make_loader`
feeds to grain directly. Every listed image is decoded once when the source is built: corrupt, missing
or unreadable ones are dropped and counted in `skipped` (logged once, with names), so training never
meets an exception mid-epoch. There is no TFDS route: `tfds.folder_dataset` needs TensorFlow, and the
grain source already gives shuffling, sharding and prefetch.
"""

from __future__ import annotations

import json
import logging
import pathlib

import numpy as np
from PIL import Image

CAPTION_FILES = ("captions.tsv", "captions.jsonl")


def _read_captions(path: pathlib.Path) -> list[tuple[str, str]]:
    pairs = []
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if path.suffix == ".tsv":
                name, sep, caption = line.partition("\t")
                if not sep:
                    raise ValueError(f"{path}:{line_no}: expected 'filename<TAB>caption', got {line!r}")
            else:
                try:
                    row = json.loads(line)
                    name, caption = row["file"], row["caption"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise ValueError(
                        f"{path}:{line_no}: expected a JSON object with 'file' and 'caption', got {line!r}"
                    ) from e
            pairs.append((name.strip(), caption.strip()))
    return pairs


def load_image(path: pathlib.Path | str, resolution: int) -> np.ndarray:
    """Decode to RGB, resize the shorter side to `resolution` (bicubic), center-crop: uint8 [r, r, 3]."""
    with Image.open(path) as img:
        img = img.convert("RGB")
        w, h = img.size
        scale = resolution / min(w, h)
        nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
        img = img.resize((nw, nh), Image.Resampling.BICUBIC, reducing_gap=3.0)
        left, top = (nw - resolution) // 2, (nh - resolution) // 2
        img = img.crop((left, top, left + resolution, top + resolution))
        return np.asarray(img, np.uint8)


class FolderSource:
    """Random-access image-caption source over a folder; items are {"image": uint8 [r, r, 3], "caption"}."""

    def __init__(self, root: str | pathlib.Path, resolution: int, *, captions_file: str | None = None):
        self.root = pathlib.Path(root)
        self.resolution = resolution
        if not self.root.is_dir():
            raise FileNotFoundError(
                f"image folder {self.root} does not exist; expected a folder holding images and "
                f"{' or '.join(CAPTION_FILES)}"
            )
        names = [captions_file] if captions_file else list(CAPTION_FILES)
        found = [self.root / n for n in names if (self.root / n).is_file()]
        if not found:
            raise FileNotFoundError(
                f"no captions file in {self.root}: expected {' or '.join(names)} "
                "('filename<TAB>caption' lines, or JSON lines {\"file\": ..., \"caption\": ...})"
            )
        self.captions_path = found[0]
        self.items: list[tuple[pathlib.Path, str]] = []
        bad: list[str] = []
        for name, caption in _read_captions(self.captions_path):
            path = self.root / name
            try:  # full decode: `Image.verify` misses truncated data in some formats
                with Image.open(path) as img:
                    img.load()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                bad.append(f"{name} ({type(e).__name__})")
                continue
            self.items.append((path, caption))
        self.skipped = len(bad)
        self.skipped_files = bad
        if bad:
            logging.warning(
                "FolderSource %s: skipped %d unreadable image(s): %s", self.root, len(bad), ", ".join(bad)
            )
        if not self.items:
            raise ValueError(f"no readable images listed in {self.captions_path} (skipped {len(bad)})")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, object]:
        path, caption = self.items[index]
        return {"image": load_image(path, self.resolution), "caption": caption}

    def __repr__(self) -> str:
        return (
            f"FolderSource(root={str(self.root)!r}, resolution={self.resolution}, len={len(self)}, "
            f"skipped={self.skipped})"
        )
