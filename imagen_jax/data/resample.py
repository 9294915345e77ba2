"""Downsampling for super-resolution inputs: one function, so training pairs and evaluation baselines agree.

A super-resolution stage learns to undo exactly the degradation its low-res inputs went through; an
evaluation baseline (e.g. bicubic upsampling of the low-res input) is only fair if it starts from the
same low-res image. Both therefore call `downsample`, with the filter config.data.lowres_downsample names.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imagen_jax.errors import ConfigError

# PIL resizes by convolution with the filter stretched to the output pixel size when reducing, so every
# one of these is anti-aliased (no aliasing from point sampling).
DOWNSAMPLE_METHODS: dict[str, Image.Resampling] = {
    "box": Image.Resampling.BOX,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def downsample(image: np.ndarray, size: int, method: str = "bicubic") -> np.ndarray:
    """Resize a uint8 [H, W, 3] image to uint8 [size, size, 3] with PIL's anti-aliased `method` filter.

    `method` is one of DOWNSAMPLE_METHODS. `size` must not exceed either side: this is for making low-res
    inputs, not for upsampling (use jax.image.resize or PIL for that).
    """
    if method not in DOWNSAMPLE_METHODS:
        raise ValueError(f"downsample method {method!r}: use one of {tuple(DOWNSAMPLE_METHODS)}")
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"downsample expects a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    if not 0 < size <= min(image.shape[:2]):
        raise ValueError(f"downsample size {size} must be in 1..{min(image.shape[:2])} for {image.shape}")
    if image.shape[:2] == (size, size):
        return image
    resized = Image.fromarray(image).resize((size, size), DOWNSAMPLE_METHODS[method])
    return np.asarray(resized, np.uint8)


def check_lowres(resolution: int, lowres_resolution: int, method: str) -> None:
    """Raise ConfigError unless (config.data.) resolution / lowres_resolution / lowres_downsample can work.

    lowres_resolution 0 is a base stage; otherwise it must be smaller than `resolution` and divide it,
    so every low-res pixel covers a whole number of high-res pixels (aligned crops depend on it).
    """
    check_int("resolution", resolution, minimum=1)
    check_int("lowres_resolution", lowres_resolution, minimum=0)
    if method not in DOWNSAMPLE_METHODS:
        raise ConfigError(
            f"config.data.lowres_downsample={method!r}: use one of {tuple(DOWNSAMPLE_METHODS)}."
        )
    if lowres_resolution == 0:
        return
    if lowres_resolution >= resolution or resolution % lowres_resolution:
        divisors = [str(d) for d in (resolution // 4, resolution // 2) if d and resolution % d == 0]
        raise ConfigError(
            f"config.data.lowres_resolution={lowres_resolution} must be smaller than and divide "
            f"config.data.resolution={resolution}: use e.g. {' or '.join(divisors) or 'a divisor'}, "
            "or 0 for a base stage."
        )


def check_int(key: str, value: object, *, minimum: int) -> None:
    """Raise ConfigError naming config.data.<key> unless `value` is an int >= minimum (bools are not)."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        what = "0 (off) or a positive int" if minimum == 0 else f"an int >= {minimum}"
        raise ConfigError(f"config.data.{key}={value!r}: expected {what}, e.g. 32.")
