"""Classical scorer for generated "shapes" images: does the image show the objects the caption describes?

No learned model, fully deterministic. Steps, per image:

1. Pixel colour: every rendered pixel is `background + a * (colour - background)` (anti-aliasing mixes an
   object colour with the black background only), so each pixel is projected onto the segment from the
   background to each palette colour; the colour with the smallest off-segment residual wins, and the
   pixel is foreground when its coverage `a` >= 0.5 and the residual is small relative to `a * |colour|`.
   Off hues, darker shades and fuzzy edges of a diffusion sample keep their colour this way.
2. Connected components (8-neighbour) per colour, by vectorised min-label propagation; specks under
   `min_area` of the image are dropped.
3. Per component, on its coverage map (soft, 1-pixel dilated, so edges count by partial coverage):
   area, centroid, width/height as the largest row/column coverage sums, fill = area / (width * height)
   (circle pi/4, square 1, triangle 1/2) and vertical skewness (apex-up triangles have their mass low,
   skew ~ -0.57; circles and squares ~ 0). Shape = nearest prototype in (fill, skew); size = larger of
   width/height against the midpoint between the small and large extents.
4. Matching: each described object takes the largest component of its colour. One-object captions judge
   the largest component in the image (the object the model drew): colour, shape, size. Two-object
   captions need both colours found; relation compares the two centroids along the dominant axis.
5. Binding failures, where both are found: `order_swapped` (the relation's axis right, the two objects
   in each other's place) and `attributes_swapped` (the two objects' shapes or sizes exchanged).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from imagen_jax.data.shapes import BACKGROUND, COLOURS, PALETTE, SIZE_RANGES, Scene

_BG = np.asarray(BACKGROUND, np.float32)
_VECS = np.asarray([PALETTE[c] for c in COLOURS], np.float32) - _BG  # [K, 3]
_VEC_SQ = (_VECS**2).sum(-1)  # [K]
_VEC_NORM = np.sqrt(_VEC_SQ)
# Split between small and large extents (fraction of the image side).
SIZE_THRESHOLD = 0.5 * (SIZE_RANGES["small"][1] + SIZE_RANGES["large"][0])
# (fill, vertical skew) prototypes as measured on 32x32 renders (a triangle's widest row undershoots its
# base, so its fill reads ~0.58, not 0.5). Blur raises a triangle's fill towards a circle's while its skew
# stays clearly negative, so skew weighs as much as fill.
_PROTOTYPES = {"circle": (np.pi / 4, 0.0), "square": (1.0, 0.0), "triangle": (0.58, -0.56)}
_SKEW_WEIGHT = 1.0


@dataclasses.dataclass(frozen=True)
class Component:
    """One detected blob: its colour name, coverage area (pixels), centroid (x, y in pixels) and shape."""

    colour: str
    area: float
    cx: float
    cy: float
    width: float
    height: float
    fill: float
    skew: float
    shape: str
    size: str


def classify_pixels(image: np.ndarray, *, rel_residual: float = 0.4) -> tuple[np.ndarray, np.ndarray]:
    """(label [H, W] int: palette index or -1 for background, coverage [H, W, K] in [0, 1])."""
    d = image.astype(np.float32) - _BG  # [H, W, 3]
    cov = np.clip(d @ _VECS.T / _VEC_SQ, 0.0, 1.0)  # [H, W, K]
    resid = np.linalg.norm(d[..., None, :] - cov[..., None] * _VECS, axis=-1)  # [H, W, K]
    best = resid.argmin(-1)
    a = np.take_along_axis(cov, best[..., None], -1)[..., 0]
    r = np.take_along_axis(resid, best[..., None], -1)[..., 0]
    # Relative residual: a colour's darker shades sit on its segment; a floor keeps near-black honest.
    fg = (a >= 0.5) & (r < np.maximum(rel_residual * a * _VEC_NORM[best], 20.0))
    return np.where(fg, best, -1), cov


def _shift(x: np.ndarray, dy: int, dx: int, fill: float) -> np.ndarray:
    """x shifted by (dy, dx) with `fill` entering at the edges."""
    out = np.full_like(x, fill)
    h, w = x.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = x[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected labels of a bool mask: (labels [H, W] with 0 = off and 1..n, n)."""
    big = mask.size + 1
    labels = np.where(mask, np.arange(1, mask.size + 1).reshape(mask.shape), big)
    # Each round every pixel takes the smallest label around it; stops when nothing changes.
    while True:
        new = labels
        for dy, dx in _NEIGHBOURS:
            new = np.minimum(new, _shift(labels, dy, dx, big))
        new = np.where(mask, new, big)
        if np.array_equal(new, labels):
            break
        labels = new
    uniq, dense = np.unique(np.where(mask, labels, 0), return_inverse=True)
    dense = dense.reshape(mask.shape)
    if uniq[0] != 0:  # every pixel on: labels already start at 1
        dense = dense + 1
    return dense, int((uniq > 0).sum())


def _dilate(mask: np.ndarray) -> np.ndarray:
    out = mask.copy()
    for dy, dx in _NEIGHBOURS:
        out |= _shift(mask, dy, dx, False)
    return out


def _classify_shape(fill: float, skew: float) -> str:
    def dist(proto: tuple[float, float]) -> float:
        return (fill - proto[0]) ** 2 + (_SKEW_WEIGHT * (skew - proto[1])) ** 2

    return min(_PROTOTYPES, key=lambda s: dist(_PROTOTYPES[s]))


def find_components(image: np.ndarray, *, min_area: float = 0.012) -> list[Component]:
    """Blobs of palette colours in `image`, largest first; `min_area` is a fraction of the image area."""
    h, w = image.shape[:2]
    label, cov = classify_pixels(image)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32) + 0.5
    comps = []
    for k in np.unique(label[label >= 0]):
        labels, n = connected_components(label == k)
        for i in range(1, n + 1):
            core = labels == i
            if core.sum() < min_area * h * w:
                continue
            # Soft mask: partial coverage on the 1-pixel rim counts, as long as it is this colour's shade.
            soft = np.where(_dilate(core) & ((label == k) | (label < 0)), cov[..., k], 0.0)
            # A model may paint a darker shade: measure coverage against the blob's own interior level,
            # else area, width and height all shrink together and fill (area / (w * h)) inflates.
            level = float(np.median(cov[..., k][core]))
            soft = np.clip(soft / max(level, 0.5), 0.0, 1.0)
            area = float(soft.sum())
            cx, cy = float((soft * xs).sum() / area), float((soft * ys).sum() / area)
            # Widest row and tallest column, by coverage: sub-pixel accurate and immune to rim pixels.
            width, height = float(soft.sum(1).max()), float(soft.sum(0).max())
            var_y = float((soft * (ys - cy) ** 2).sum() / area)
            skew = float((soft * (ys - cy) ** 3).sum() / area) / max(var_y, 1e-6) ** 1.5
            fill = area / max(width * height, 1e-6)
            extent = max(width, height) / max(h, w)
            comps.append(
                Component(
                    colour=COLOURS[int(k)],
                    area=area,
                    cx=cx,
                    cy=cy,
                    width=width,
                    height=height,
                    fill=fill,
                    skew=skew,
                    shape=_classify_shape(fill, skew),
                    size="large" if extent >= SIZE_THRESHOLD else "small",
                )
            )
    return sorted(comps, key=lambda c: -c.area)


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _relation(a: Component, b: Component) -> str:
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def score_image(image: np.ndarray, scene: Scene) -> dict[str, bool | None]:
    """Per-attribute correctness of `image` (uint8 [H, W, 3]) against `scene`.

    Keys: colour, shape, size, relation (None for one object), found (every described object has a
    component of its colour), all_correct. For two objects, colour/shape/size need both objects right;
    order_swapped and attributes_swapped (None for one object) name the binding failures (module doc).
    """
    comps = find_components(image)
    by_colour: dict[str, Component] = {}
    for c in comps:  # largest first: keep the biggest blob per colour
        by_colour.setdefault(c.colour, c)
    matched = [by_colour.get(o.colour) for o in scene.objects]
    found = all(m is not None for m in matched)
    if len(scene.objects) == 1:
        obj = scene.objects[0]
        main = comps[0] if comps else None
        colour = main is not None and main.colour == obj.colour
        shape = main is not None and main.shape == obj.shape
        size = main is not None and main.size == obj.size
        return {
            "colour": colour,
            "shape": shape,
            "size": size,
            "relation": None,
            "found": found,
            "all_correct": bool(colour and shape and size),
            "order_swapped": None,
            "attributes_swapped": None,
        }
    shape = found and all(m.shape == o.shape for m, o in zip(matched, scene.objects, strict=True))
    size = found and all(m.size == o.size for m, o in zip(matched, scene.objects, strict=True))
    relation = found and _relation(matched[0], matched[1]) == scene.relation
    a, b = scene.objects
    swapped = found and any(
        getattr(a, k) != getattr(b, k)
        and (getattr(matched[0], k), getattr(matched[1], k)) == (getattr(b, k), getattr(a, k))
        for k in ("shape", "size")
    )
    return {
        "colour": found,
        "shape": bool(shape),
        "size": bool(size),
        "relation": bool(relation),
        "found": found,
        "all_correct": bool(found and shape and size and relation),
        "order_swapped": found and _relation(matched[0], matched[1]) == _OPPOSITE[scene.relation],
        "attributes_swapped": bool(swapped),
    }


def score_batch(images: Sequence[np.ndarray] | np.ndarray, scenes: Sequence[Scene]) -> dict[str, dict]:
    """Aggregate `score_image` over a batch.

    Returns {"one_object": {count, colour, size, shape, all_correct},
             "two_objects": {count, found, colour, size, shape, relation, relation_count, all_correct,
                             order_swapped, attributes_swapped},
             "overall": {count, all_correct}}; accuracies are fractions (None when the count is 0).
    Two-object relation accuracy and the swap rates are over images where both objects are found
    (relation_count of them).
    """
    if len(images) != len(scenes):
        raise ValueError(f"{len(images)} images but {len(scenes)} scenes")
    rows = [score_image(np.asarray(im), sc) for im, sc in zip(images, scenes, strict=True)]
    one = [r for r, s in zip(rows, scenes, strict=True) if len(s.objects) == 1]
    two = [r for r, s in zip(rows, scenes, strict=True) if len(s.objects) == 2]

    def mean(rs: list[dict], key: str) -> float | None:
        return float(np.mean([bool(r[key]) for r in rs])) if rs else None

    found_two = [r for r in two if r["found"]]
    return {
        "one_object": {
            "count": len(one),
            **{k: mean(one, k) for k in ("colour", "size", "shape", "all_correct")},
        },
        "two_objects": {
            "count": len(two),
            **{k: mean(two, k) for k in ("found", "colour", "size", "shape")},
            "relation": mean(found_two, "relation"),
            "relation_count": len(found_two),
            "all_correct": mean(two, "all_correct"),
            "order_swapped": mean(found_two, "order_swapped"),
            "attributes_swapped": mean(found_two, "attributes_swapped"),
        },
        "overall": {"count": len(rows), "all_correct": mean(rows, "all_correct")},
    }


def format_table(table: dict[str, dict]) -> str:
    """A small plain-text table of `score_batch` output, for logs and the README."""
    def cell(v: object) -> str:
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    lines = []
    for group, stats in table.items():
        cells = [f"{k}={cell(v)}" for k, v in stats.items()]
        lines.append(f"{group:12s} " + " ".join(cells))
    return "\n".join(lines)
