r"""How the shapes demo's text encoder represents its words: colours across framings, and which object of a
two-object caption each word belongs to.

    python benchmarks/text_wording_probe.py                           # the config's seeded T5 on bytes
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
from imagen_jax.data import shapes
from imagen_jax.stage.build import load_stage
from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.encoder import TextEncoder

_ROLE_WORDS = ("size", "colour", "shape")


def _word_tokens(encoder: TextEncoder, caption: str, start: int, word: str) -> slice:
    """The token positions of the first `word` at or after character `start` of `caption`: those the
    caption's prefix gains when the word is added."""
    count = lambda text: int(encoder.tokenizer([text])["text_mask"][0].sum()) - 1  # noqa: E731 (EOS aside)
    at = caption.index(word, start)
    return slice(count(caption[:at].rstrip()), count(caption[: at + len(word)]))


def colour_embeddings(encoder: TextEncoder, framings: tuple[str, ...]) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for framing, colour in itertools.product(framings, shapes.COLOURS):
        caption = framing.format(a=f"small {colour} square")
        emb, _ = encoder.encode([caption])
        out[(framing, colour)] = np.asarray(emb[0])[_word_tokens(encoder, caption, 0, colour)].mean(0)
    return out


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
    rows = {word: ([], [], []) for word in _ROLE_WORDS}  # features, is the subject, is first in the image
    for begin in range(0, num, 256):
        chunk = slice(begin, begin + 256)
        emb = np.asarray(encoder.encode(captions[chunk])[0])
        for i, (caption, scene) in enumerate(zip(captions[chunk], scenes[chunk], strict=True)):
            a_first = scene.relation in ("left", "above")
            for k, obj in enumerate(scene.objects):
                phrase = obj.describe()
                start = caption.index(phrase) if k == 0 else caption.rindex(phrase)
                for word, text in zip(_ROLE_WORDS, (obj.size, obj.colour, obj.shape), strict=True):
                    features, subject, first = rows[word]
                    features.append(emb[i, _word_tokens(encoder, caption, start, text)].mean(0))
                    subject.append(k == 0)
                    first.append((k == 0) == a_first)
    out = {}
    for word, (features, subject, first) in rows.items():
        out[f"{word}: subject"] = _probe_accuracy(np.array(features), np.array(subject))
        out[f"{word}: first in image"] = _probe_accuracy(np.array(features), np.array(first))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=None, help="a trained run: probe its text encoder")
    args = parser.parse_args()
    if args.workdir:
        encoder = load_stage(args.workdir).text
    else:  # the seeded T5 on bytes, as the demo read captions before it learned their words
        text = get_config().text
        text.update(dict(tokenizer="byte", max_length=84))
        encoder = build_text_encoder(text)
    result = probe(encoder)
    common.print_table([result], list(result))
    print()
    roles = [{"captions": wording, **role_probe(encoder, wording)} for wording in shapes.WORDINGS]
    common.print_table(roles, list(roles[0]))


if __name__ == "__main__":
    main()
