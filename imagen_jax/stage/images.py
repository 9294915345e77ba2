"""Image output: [-1, 1] floats to uint8, PNG grids with the prompts written beside them."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from PIL import Image

from imagen_jax.errors import UsageError
from imagen_jax.parallel import distributed


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Model-range floats [-1, 1] -> uint8 pixels (rounded, clipped)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def side_by_side(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """The images of several stages (or a stage's input and output) next to each other, each enlarged to
    the largest size by pixel repetition so what each stage added stays visible: [N * len(outputs), R, R,
    3] in row order, for `save_grid(..., columns=len(outputs) * k)`."""
    size = max(x.shape[1] for x in outputs)
    enlarged = [x.repeat(size // x.shape[1], axis=1).repeat(size // x.shape[2], axis=2) for x in outputs]
    return np.stack(enlarged, axis=1).reshape(-1, *enlarged[-1].shape[1:])


def make_grid(images: np.ndarray, *, columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tiles uint8 images [N, H, W, C] into one image, `columns` wide (default: near square)."""
    n, h, w, c = images.shape
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    grid = np.full((rows * (h + pad) + pad, columns * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[
            pad + r * (h + pad) : pad + r * (h + pad) + h, pad + col * (w + pad) : pad + col * (w + pad) + w
        ] = image
    return grid


def image_format_of(path: str | os.PathLike) -> str:
    """PIL's format for `path`, from its suffix as `Image.save(filename)` chooses it (e.g. "PNG")."""
    suffix = os.path.splitext(os.fspath(path))[1]
    image_format = Image.registered_extensions().get(suffix.lower())
    if image_format is None:
        raise UsageError(f"unknown image file extension {suffix!r} in {os.fspath(path)}; use e.g. .png")
    return image_format


def save_grid(
    images: np.ndarray,
    prompts: Sequence[str],
    path: str | os.PathLike,
    *,
    columns: int | None = None,
    upscale: int = 1,
) -> tuple[str, str]:
    """Writes the PNG grid and `<path minus .png>.txt` (one `index<TAB>prompt` line per image, row-major);
    returns both paths.

    `path` may be local or a `gs://` URL (through etils epath). Call it on every process: only process 0
    writes (the others return the same paths), so a multi-host run writes each grid once.
    """
    path = os.fspath(path)
    txt = os.path.splitext(path)[0] + ".txt"  # string ops: the same for local paths and gs:// URLs
    if not distributed.is_primary():
        return path, txt
    out = epath.Path(path)
    image_format = image_format_of(path)
    grid = make_grid(images, columns=columns)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = Image.fromarray(grid)
    if upscale > 1:
        picture = picture.resize((grid.shape[1] * upscale, grid.shape[0] * upscale), Image.NEAREST)
    with out.open("wb") as f:
        picture.save(f, format=image_format)
    with epath.Path(txt).open("w", encoding="utf-8") as f:
        for i, prompt in enumerate(prompts):
            f.write(f"{i}\t{prompt}\n")
    return path, txt
