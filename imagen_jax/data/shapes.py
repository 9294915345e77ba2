"""Procedural "shapes" scenes: flat coloured circles, squares and triangles on a black background.

The dataset is built to be learnable by a small diffusion model at 32x32 in minutes on a CPU, and to be
scored by a classical program (`imagen_jax.evaluation.shapes_scorer`):

* flat, saturated, well separated palette colours on a fixed black background, so every pixel is
  `background + coverage * (colour - background)` and colour classification is a projection;
* two sizes far apart (small ~9-10 px, large ~15-18 px across at 32x32) and three shapes whose bounding
  box is always a square of side `extent`, so fill ratio (circle pi/4, square 1, triangle 1/2) tells them
  apart at any resolution;
* two-object scenes never overlap and their relation is unambiguous: the centre gap along the relation
  axis exceeds the object half-sizes plus a margin, and the cross-axis offset is at most a third of it.

Geometry is stored in normalised [0, 1] image coordinates (x right, y down), so one scene renders at any
resolution; low-res and high-res renders of the same scene form exact super-resolution pairs.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
import zlib
from collections.abc import Sequence

import numpy as np

# Saturated, pairwise far apart in RGB (closest pair ~150 apart) and far from the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 70, 255),
    "yellow": (250, 230, 30),
    "purple": (180, 50, 230),
    "cyan": (30, 220, 230),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
# Side of the (square) bounding box as a fraction of the image side; the scorer splits at ~0.40.
SIZE_RANGES: dict[str, tuple[float, float]] = {"small": (0.27, 0.32), "large": (0.48, 0.56)}
RELATIONS: tuple[str, ...] = ("left", "right", "above", "below")
# Fill ratio of the bounding box per shape (used by the scorer and to sanity-check renders).
FILL_RATIO: dict[str, float] = {"circle": float(np.pi / 4), "square": 1.0, "triangle": 0.5}

_BORDER = 0.02  # min distance between an object and the image edge
_GAP = 0.06  # min empty space between the two objects along the relation axis
_MAX_CROSS = 1.0 / 3.0  # max cross-axis offset as a fraction of the main-axis centre distance
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """One object; `extent` is the side of its square bounding box, (cx, cy) its centre, all in [0, 1]."""

    colour: str
    shape: str
    size: str
    extent: float
    cx: float
    cy: float

    def describe(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"


@dataclasses.dataclass(frozen=True)
class Scene:
    """One or two objects; for two, `relation` says where objects[0] is relative to objects[1]."""

    objects: tuple[ShapeObject, ...]
    relation: str | None = None

    def to_json(self) -> str:
        return json.dumps(
            {"objects": [dataclasses.asdict(o) for o in self.objects], "relation": self.relation},
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> Scene:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        data = json.loads(text)
        return cls(tuple(ShapeObject(**o) for o in data["objects"]), data["relation"])


def relation_holds(a: ShapeObject, b: ShapeObject, relation: str) -> bool:
    """True when the centre of `a` is `relation` of `b` along the dominant axis of their offset."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if relation in ("left", "right"):
        return abs(dx) > abs(dy) and (dx < 0) == (relation == "left")
    if relation in ("above", "below"):
        return abs(dy) > abs(dx) and (dy < 0) == (relation == "above")
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def _sample_extent(rng: np.random.Generator, size: str) -> float:
    lo, hi = SIZE_RANGES[size]
    return float(rng.uniform(lo, hi))


def _sample_pair_positions(
    rng: np.random.Generator, ea: float, eb: float, relation: str
) -> tuple[float, float, float, float]:
    """Centres (ax, ay, bx, by) with `a` `relation` of `b`, no overlap, inside the image."""
    # Work in (main, cross) coordinates where a is before b on the main axis, then map back.
    lo_d = (ea + eb) / 2 + _GAP
    hi_d = 1 - 2 * _BORDER - (ea + eb) / 2
    for _ in range(100):
        d = rng.uniform(lo_d, hi_d)
        a_main = rng.uniform(_BORDER + ea / 2, 1 - _BORDER - eb / 2 - d)
        b_main = a_main + d
        off = rng.uniform(-_MAX_CROSS, _MAX_CROSS) * d
        a_cross = rng.uniform(_BORDER + ea / 2, 1 - _BORDER - ea / 2)
        b_cross = a_cross + off
        if _BORDER + eb / 2 <= b_cross <= 1 - _BORDER - eb / 2:
            break
    else:  # pragma: no cover - the ranges above always leave room; keep it safe anyway
        b_cross = a_cross = 0.5
    if relation in ("right", "below"):  # a after b on the main axis
        a_main, b_main = 1 - a_main, 1 - b_main
    if relation in ("left", "right"):
        return a_main, a_cross, b_main, b_cross
    return a_cross, a_main, b_cross, b_main


def sample_scene(rng: np.random.Generator, *, p_two: float = 0.5) -> Scene:
    """A random scene with one object, or two (with probability `p_two`) in a random relation.

    Two-object scenes use two different colours (so the caption names each object uniquely) and never
    two large objects (two ~0.5-wide objects side by side would not fit with a clear gap).
    """
    if rng.random() >= p_two:
        colour, shape, size = rng.choice(COLOURS), rng.choice(SHAPES), rng.choice(SIZES)
        e = _sample_extent(rng, str(size))
        cx, cy = rng.uniform(_BORDER + e / 2, 1 - _BORDER - e / 2, size=2)
        return Scene((ShapeObject(str(colour), str(shape), str(size), e, float(cx), float(cy)),))
    ca, cb = rng.choice(COLOURS, size=2, replace=False)
    sa, sb = rng.choice(SHAPES, size=2)
    size_pairs = (("small", "small"), ("small", "large"), ("large", "small"))
    za, zb = size_pairs[int(rng.integers(len(size_pairs)))]
    relation = str(rng.choice(RELATIONS))
    ea, eb = _sample_extent(rng, za), _sample_extent(rng, zb)
    ax, ay, bx, by = _sample_pair_positions(rng, ea, eb, relation)
    a = ShapeObject(str(ca), str(sa), za, ea, float(ax), float(ay))
    b = ShapeObject(str(cb), str(sb), zb, eb, float(bx), float(by))
    return Scene((a, b), relation)


# Caption wordings. The object phrase ("small blue square") and the relation phrase always appear
# verbatim; the framing around them varies. Training draws from many framings so that a model must find
# the object phrases by what they say, not where they sit in the caption.
WORDINGS: tuple[str, ...] = ("standard", "heldout")
_TRAIN_ONE = (
    "a {a}",
    "a {a}.",
    "there is a {a}",
    "a picture of a {a}",
    "an image with a {a}",
    "one {a} on a black background",
    "an image of a {a}",
    "a single {a}",
    "the {a}",
    "a {a} on black",
    "just a {a}",
    "a {a} in the picture",
    "a render of a {a}",
    "a {a}, nothing else",
    "a scene with one {a}",
    "showing a {a}",
)
_TRAIN_TWO = (
    "a {a} {rel} a {b}",
    "there is a {a} {rel} a {b}",
    "a picture of a {a} {rel} a {b}",
    "an image where a {a} is {rel} a {b}",
    "the {a} is {rel} the {b}",
    "a scene with a {a} {rel} a {b}",
    "a {a} that is {rel} a {b}",
    "an image of a {a} {rel} a {b}",
    "a {a} {rel} a {b} on black",
    "a render of a {a} {rel} a {b}",
)
# Held out: framings no training caption uses (tests/test_shapes_data.py checks the training stream),
# mostly of words training never shows, as a user would type them. Evaluation scores these beside the
# standard ones (`eval_set(..., wording="heldout")`) on the very same scenes.
_HELDOUT_ONE = (
    "here we see a {a}",
    "this photo shows a {a}",
    "my drawing: a {a}",
    "{a}",
    "can you draw a {a}?",
    "look, a {a} appears",
)
_HELDOUT_TWO = (
    "here we see a {a} {rel} a {b}",
    "this photo shows a {a} {rel} a {b}",
    "can you draw a {a} {rel} a {b}?",
    "a {a} placed {rel} a {b}",
    "look, a {a} sits {rel} a {b}",
)
_TEMPLATES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "standard": (_TRAIN_ONE, _TRAIN_TWO),
    "heldout": (_HELDOUT_ONE, _HELDOUT_TWO),
}
RELATION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("to the left of", "on the left of", "left of"),
    "right": ("to the right of", "on the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}


def caption_templates(wording: str = "standard") -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(one-object, two-object) templates of a wording: "standard" (training) or "heldout"."""
    if wording not in _TEMPLATES:
        raise ValueError(f"unknown caption wording {wording!r}; expected one of {WORDINGS}")
    return _TEMPLATES[wording]


# Made-up words in the framing of training captions (`with_made_up_words`, `config.data.made_up_words`).
# A run's vocabulary is learned from its training captions, so a word they never use, like most of a
# user's framing ("this photo shows ..."), is spelled in pieces training never feeds the text encoder:
# their embeddings stay at initialisation, and the frozen encoder's outputs for the caption's object
# words drift with them. Random letter strings around the object and relation phrases (never inside
# them) train those pieces and teach the encoder, and the U-Net after it, that words naming no object or
# relation change nothing. They are not the held-out wordings: no made-up word is a word of any template.
_PUNCTUATION = "!\"#$%&'()*+-./:;<=>?@[]^_`|~"
_KNOWN_WORDS = frozenset(
    word.strip(string.punctuation)
    for text in (*COLOURS, *SHAPES, *SIZES, *(p for ps in RELATION_PHRASES.values() for p in ps),
                 *(t for one, two in _TEMPLATES.values() for t in (*one, *two)))
    for word in text.split()
)


def made_up_word(rng: np.random.Generator) -> str:
    """2-8 random letters, no word of the caption grammars (training or held-out), a fifth of the time
    followed by a punctuation mark."""
    while True:
        word = "".join(rng.choice(list(string.ascii_lowercase), size=int(rng.integers(2, 9))))
        if word not in _KNOWN_WORDS:
            break
    if rng.random() < 0.2:
        word += _PUNCTUATION[int(rng.integers(len(_PUNCTUATION)))]
    return word


def with_made_up_words(caption: str, scene: Scene, rng: np.random.Generator, max_words: int) -> str:
    """`caption` with 1..max_words `made_up_word`s inserted at word boundaries outside its object and
    relation phrases (the start and end included), which stay verbatim."""
    phrases = [obj.describe() for obj in scene.objects]
    if scene.relation is not None:  # the longest match: "to the left of", not the "left of" inside it
        phrases += sorted((p for p in RELATION_PHRASES[scene.relation] if p in caption), key=len)[-1:]
    protected = [(caption.find(p), caption.find(p) + len(p)) for p in phrases if p in caption]
    words = caption.split(" ")
    starts = np.cumsum([0] + [len(w) + 1 for w in words])  # each word's start, then past the end
    gaps = [i for i, at in enumerate(starts) if not any(lo < at < hi for lo, hi in protected)]
    chosen = rng.choice(gaps, size=int(rng.integers(1, max_words + 1)))
    for i in sorted(chosen.tolist(), reverse=True):  # from the end, so earlier indices stay valid
        words.insert(i, made_up_word(rng))
    return " ".join(words)


def caption_for(scene: Scene, rng: np.random.Generator, wording: str = "standard") -> str:
    """A caption for `scene` in one of the `wording`'s templates; describes every object fully."""
    one, two = caption_templates(wording)
    if len(scene.objects) == 1:
        template = one[int(rng.integers(len(one)))]
        return template.format(a=scene.objects[0].describe())
    if scene.relation is None:
        raise ValueError("a two-object scene needs a relation")
    template = two[int(rng.integers(len(two)))]
    phrases = RELATION_PHRASES[scene.relation]
    rel = phrases[int(rng.integers(len(phrases)))]
    return template.format(a=scene.objects[0].describe(), rel=rel, b=scene.objects[1].describe())


# Relations that put objects[0] left of or above objects[1].
FIRST_IN_IMAGE: tuple[str, ...] = ("left", "above")


SIDE_TAGS: tuple[str, ...] = ("first_in_image", "named_first", "relation_first")
# The side tags, then the object's attributes one-hot.
OBJECT_TAGS: tuple[str, ...] = (
    *SIDE_TAGS,
    *(f"colour={c}" for c in COLOURS),
    *(f"shape={s}" for s in SHAPES),
    *(f"size={z}" for z in SIZES),
)


def object_tags(caption: str, scene: Scene) -> list[tuple[int, int, tuple[int, ...]]]:
    """(start, end, tags) character spans of the words of each object phrase in the scene's caption. The
    tags (`OBJECT_TAGS`) are 0, 1, or -1 where they do not apply:
    - first_in_image: is the word's object the left or top one in the image (two objects);
    - named_first: is it the object the caption names first (two objects);
    - relation_first: does the relation put the first-named object first, left or above (two objects);
    - its object's colour, shape and size, one-hot (every object).
    "a red square right of a blue circle" tags "blue" and "circle" (1, 0, 0, blue, circle, size), the red
    square's words (0, 1, 0, red, square, size).

    The text encoder's pretraining task (`text.pretrain.tag_weight`). The first tag is what the U-Net needs
    and failed to learn: which object the caption puts first in the image is the exclusive-or of the next
    two (docs/shapes_demo.md, binding). They are each a linear read of the caption, and given them, the
    encoder's gated feed-forward layers form their product: without them the first tag sat at chance for
    as long as the seed decided. The attributes keep every word of a phrase saying what its object looks
    like: tagged with its side alone, the encoder let a colour's embedding depend more on the framing
    around it than on the colour.
    """
    if len(scene.objects) == 2:
        relation_first = int(scene.relation in FIRST_IN_IMAGE)
        sides = [(int(named == relation_first), named, relation_first) for named in (1, 0)]
    else:
        sides = [(-1, -1, -1)]
    spans = []
    for obj, side in zip(scene.objects, sides, strict=True):
        phrase = obj.describe()
        at = caption.find(phrase)
        if at < 0 or caption.find(phrase, at + 1) >= 0:
            raise ValueError(f"caption {caption!r} does not name {phrase!r} exactly once.")
        attributes = tuple(int(obj.colour == c) for c in COLOURS) + tuple(
            int(obj.shape == x) for x in SHAPES) + tuple(int(obj.size == z) for z in SIZES)
        for word in re.finditer(r"\S+", phrase):
            spans.append((at + word.start(), at + word.end(), side + attributes))
    return spans


def _coverage(obj: ShapeObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Inside-test of `obj` at sample points (xs [1, W], ys [H, 1] in [0, 1] coords) -> bool [H, W]."""
    h = obj.extent / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= h * h
    if obj.shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if obj.shape == "triangle":  # apex up, base at the bottom of the box; half-width grows from 0 to h
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}; expected one of {SHAPES}")


def render(scene: Scene, resolution: int, *, supersample: int = 4) -> np.ndarray:
    """Render `scene` to uint8 [resolution, resolution, 3], anti-aliased by supersampling.

    Each object only touches the pixels under its bounding box, so cost scales with object area.
    """
    n = resolution * supersample
    image = np.empty((resolution, resolution, 3), np.float32)
    image[:] = BACKGROUND
    for obj in scene.objects:
        # Pixel window covering the bounding box (one pixel of slack for rounding).
        lo_x = max(int(np.floor((obj.cx - obj.extent / 2) * resolution)) - 1, 0)
        hi_x = min(int(np.ceil((obj.cx + obj.extent / 2) * resolution)) + 1, resolution)
        lo_y = max(int(np.floor((obj.cy - obj.extent / 2) * resolution)) - 1, 0)
        hi_y = min(int(np.ceil((obj.cy + obj.extent / 2) * resolution)) + 1, resolution)
        # Sub-pixel sample centres inside the window.
        xs = (np.arange(lo_x * supersample, hi_x * supersample) + 0.5)[None, :] / n
        ys = (np.arange(lo_y * supersample, hi_y * supersample) + 0.5)[:, None] / n
        inside = _coverage(obj, xs, ys)
        cov = inside.reshape(hi_y - lo_y, supersample, hi_x - lo_x, supersample).mean(axis=(1, 3))
        window = image[lo_y:hi_y, lo_x:hi_x]
        colour = np.asarray(PALETTE[obj.colour], np.float32)
        window += cov[..., None].astype(np.float32) * (colour - window)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """Independent generator per (seed, split, index); split names hash stably (crc32, not hash())."""
    code = _SPLIT_CODES.get(split, zlib.crc32(split.encode("utf-8")))
    return np.random.default_rng(np.random.SeedSequence([seed, code, index]))


def make_example(
    seed: int,
    split: str,
    index: int,
    resolution: int | Sequence[int] = 32,
    *,
    p_two: float = 0.5,
    made_up_prob: float = 0.0,
    made_up_max: int = 2,
) -> dict[str, object]:
    """Deterministic example for (seed, split, index): {"image_<r>": uint8 per resolution, "image" (the
    first resolution), "caption": str, "scene": JSON str}. All resolutions render the same scene. With
    made_up_prob > 0 that share of captions gets 1..made_up_max made-up words (`with_made_up_words`)."""
    rng = example_rng(seed, split, index)
    scene = sample_scene(rng, p_two=p_two)
    caption = caption_for(scene, rng)
    # Drawn after the caption, so scenes and captions are those of made_up_prob=0 (and `eval_set`'s).
    if made_up_prob > 0 and rng.random() < made_up_prob:
        caption = with_made_up_words(caption, scene, rng, made_up_max)
    resolutions = [resolution] if isinstance(resolution, int) else list(resolution)
    out: dict[str, object] = {f"image_{r}": render(scene, r) for r in resolutions}
    out["image"] = out[f"image_{resolutions[0]}"]
    out["caption"] = caption
    out["scene"] = scene.to_json()
    return out


def eval_set(
    num: int, *, seed: int = 0, split: str = "test", p_two: float = 0.5, wording: str = "standard"
) -> list[tuple[str, Scene]]:
    """Held-out (caption, scene) pairs: the same stream as `make_example(seed, split, i)`, no rendering.

    Use a split (default "test") the model never trained on; captions are new scenes, though the short
    one-object captions can repeat training captions verbatim (there are only 42 attribute combinations).
    `wording="heldout"` captions the very same scenes with the held-out templates instead.
    """
    caption_templates(wording)  # an unknown wording fails before any work
    pairs = []
    for i in range(num):
        rng = example_rng(seed, split, i)
        scene = sample_scene(rng, p_two=p_two)
        pairs.append((caption_for(scene, rng, wording), scene))
    return pairs
