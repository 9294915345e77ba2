r"""How the shapes demo's text encoder represents its words: colours across framings, and which object of a
two-object caption each word belongs to.

    python benchmarks/text_wording_probe.py                           # the seeded T5 on bytes
    python benchmarks/text_wording_probe.py --workdir runs/shapes_pt  # a run's own encoder

Wording: for every colour and framing, the colour word's embedding is the mean over its tokens of
"<framing> small <colour> square". Prints how alike one colour's embeddings are across framings, how alike
different colours are within a framing (cosine), and how often the nearest colour centroid of the training
framings names the right colour under each held-out framing.

Roles (binding): on 3,000 two-object captions per caption set, a linear probe (ridge regression on 70%,
accuracy on the rest; chance 50%) reads from each size, colour and shape word's own embedding whether its
object is the caption's first (the subject) and whether it is the first in the image (left or top). The
U-Net's cross-attention sees each word through a linear key, so a word that does not hold its object's
role leaves the U-Net to guess which object goes where. Nothing is trained or sampled: seconds on CPU.
"""

from __future__ import annotations

import argparse
import itertools

import common  # also puts the project root on sys.path
import numpy as np

from configs.shapes import get_config
from imagen_jax import cli
from imagen_jax.data import shapes
from imagen_jax.stage.build import load_stage
from imagen_jax.text import pretrain
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.encoder import TextEncoder

_ROLE_WORDS = ("size", "colour", "shape")


def colour_embeddings(encoder: TextEncoder, framings: tuple[str, ...]) -> dict[tuple[str, str], np.ndarray]:
    keys = list(itertools.product(framings, shapes.COLOURS))
    captions = [framing.format(a=f"small {colour} square") for framing, colour in keys]
    spans = [[(c.index(colour), c.index(colour) + len(colour))]
             for c, (_, colour) in zip(captions, keys, strict=True)]
    ranges = pretrain.token_ranges(captions, spans, encoder.tokenizer)
    emb = np.asarray(encoder.encode(captions)[0])
    return {key: emb[i, slice(*ranges[i][0])].mean(0) for i, key in enumerate(keys)}


def probe(encoder: TextEncoder) -> dict[str, float]:
    train, _ = shapes.caption_templates("standard")
    held, _ = shapes.caption_templates("heldout")
    emb = colour_embeddings(encoder, train + held)
    cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))  # noqa: E731
    pairs = itertools.combinations
    same = [cos(emb[(f, c)], emb[(g, c)]) for c in shapes.COLOURS for f, g in pairs(train + held, 2)]
    diff = [cos(emb[(f, c)], emb[(f, d)]) for f in train + held for c, d in pairs(shapes.COLOURS, 2)]
    centroid = {c: np.mean([emb[(f, c)] for f in train], 0) for c in shapes.COLOURS}
    nearest = lambda v: max(shapes.COLOURS, key=lambda c: cos(v, centroid[c]))  # noqa: E731
    hits = [nearest(emb[(f, c)]) == c for f in held for c in shapes.COLOURS]
    return {
        "same_colour_across_framings_cos": float(np.mean(same)),
        "different_colours_same_framing_cos": float(np.mean(diff)),
        "heldout_nearest_centroid_accuracy": float(np.mean(hits)),
    }


def _probe_accuracy(features: np.ndarray, labels: np.ndarray, train_share: float = 0.7) -> float:
    x = np.concatenate([features, np.ones((len(features), 1))], 1)
    n = int(train_share * len(x))
    targets = np.where(labels[:n], 1.0, -1.0)
    w = np.linalg.solve(x[:n].T @ x[:n] + 1e-2 * np.eye(x.shape[1]), x[:n].T @ targets)
    return float(np.mean((x[n:] @ w > 0) == labels[n:]))


def role_probe(encoder: TextEncoder, wording: str, num: int = 3000, seed: int = 0) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    scenes = [shapes.sample_scene(rng, p_two=1.0) for _ in range(num)]
    captions = [shapes.caption_for(scene, rng, wording) for scene in scenes]
    # Size, colour and shape of each object in turn, with its tags (data.shapes.OBJECT_TAGS).
    spans = [shapes.object_tags(caption, scene) for caption, scene in zip(captions, scenes, strict=True)]
    ranges = pretrain.token_ranges(captions, spans, encoder.tokenizer)
    first_in_image, named_first = (shapes.OBJECT_TAGS.index(t) for t in ("first_in_image", "named_first"))
    rows = {word: ([], [], []) for word in _ROLE_WORDS}  # features, is the subject, is first in the image
    for begin in range(0, num, 256):
        emb = np.asarray(encoder.encode(captions[begin : begin + 256])[0])
        for i in range(begin, min(begin + 256, num)):
            for k, ((_, _, tags), (lo, hi)) in enumerate(zip(spans[i], ranges[i], strict=True)):
                features, subject, first = rows[_ROLE_WORDS[k % 3]]
                features.append(emb[i - begin, lo:hi].mean(0))
                subject.append(bool(tags[named_first]))
                first.append(bool(tags[first_in_image]))
    out = {}
    for word, (features, subject, first) in rows.items():
        out[f"{word}: subject"] = _probe_accuracy(np.array(features), np.array(subject))
        out[f"{word}: first in image"] = _probe_accuracy(np.array(features), np.array(first))
    return out


def main() -> None:
    parser = cli.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=None, help="a trained run: probe its text encoder")
    args = parser.parse_args()
    if args.workdir:
        encoder = load_stage(args.workdir).text
    else:  # the seeded T5 on bytes, as the demo read captions before it learned their words
        text = get_config().text
        text.update(dict(encoder="random", tokenizer="byte", max_length=84))
        encoder = build_text_encoder(text)
    result = probe(encoder)
    common.print_table([result], list(result))
    print()
    roles = [{"captions": wording, **role_probe(encoder, wording)} for wording in shapes.WORDINGS]
    common.print_table(roles, list(roles[0]))


if __name__ == "__main__":
    cli.run_argparse(main)
