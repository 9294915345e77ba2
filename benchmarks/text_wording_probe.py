r"""How the shapes demo's text encoder represents colour words under the training and held-out framings.

    python benchmarks/text_wording_probe.py                           # the config's seeded T5 on bytes
    python benchmarks/text_wording_probe.py --workdir runs/shapes_pt  # a run's own encoder ("pretrain")

For every colour and framing, the colour word's embedding is the mean over its tokens of "<framing> small
<colour> square". Prints how alike one colour's embeddings are across framings, how alike different
colours are within a framing (cosine), and how often the nearest colour centroid of the training framings
names the right colour under each held-out framing. Nothing is trained or sampled: a few seconds on CPU.
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


def colour_embeddings(encoder: TextEncoder, framings: tuple[str, ...]) -> dict[tuple[str, str], np.ndarray]:
    out = {}
    for framing, colour in itertools.product(framings, shapes.COLOURS):
        caption = framing.format(a=f"small {colour} square")
        end = caption.index(colour) + len(colour)
        # The colour word's tokens: those the caption's prefix gains when the colour is added (EOS aside).
        count = lambda text: int(encoder.tokenizer([text])["text_mask"][0].sum()) - 1  # noqa: E731
        start, stop = count(caption[: end - len(colour)].rstrip()), count(caption[:end])
        emb, _ = encoder.encode([caption])
        out[(framing, colour)] = np.asarray(emb[0])[start:stop].mean(0)
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


if __name__ == "__main__":
    main()
