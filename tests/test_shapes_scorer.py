"""Classical shapes scorer: near perfect on clean and mildly corrupted renders, low on noise and blanks."""

import dataclasses

import numpy as np
import pytest

from imagen_jax.data import shapes
from imagen_jax.evaluation import shapes_scorer


@pytest.fixture(scope="module")
def scenes():
    return [scene for _, scene in shapes.eval_set(300, seed=11, p_two=0.5)]


def _blur_and_noise(image, rng, sigma=10.0):
    """[1, 2, 1] / 4 blur in both directions, per-image colour tint and Gaussian pixel noise."""
    x = image.astype(np.float32)
    for axis in (0, 1):
        pad = [(1, 1) if a == axis else (0, 0) for a in range(3)]
        p = np.pad(x, pad, mode="edge")
        lo, hi = np.take(p, range(0, x.shape[axis]), axis), np.take(p, range(2, x.shape[axis] + 2), axis)
        x = 0.25 * lo + 0.5 * x + 0.25 * hi
    x = x * rng.uniform(0.85, 1.05) + rng.normal(0, 10, (1, 1, 3)) + rng.normal(0, sigma, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_clean_renders_score_near_perfect(scenes):
    table = shapes_scorer.score_batch([shapes.render(s, 32) for s in scenes], scenes)
    assert table["one_object"]["count"] > 100 and table["two_objects"]["count"] > 100
    assert table["overall"]["all_correct"] >= 0.98, shapes_scorer.format_table(table)
    assert table["two_objects"]["relation_count"] == table["two_objects"]["count"]


def test_blurred_noisy_renders_still_score_high(scenes):
    rng = np.random.default_rng(0)
    images = [_blur_and_noise(shapes.render(s, 32), rng) for s in scenes]
    table = shapes_scorer.score_batch(images, scenes)
    assert table["overall"]["all_correct"] >= 0.95, shapes_scorer.format_table(table)


def test_speckles_are_ignored(scenes):
    rng = np.random.default_rng(1)
    images = []
    for s in scenes[:100]:
        img = shapes.render(s, 32)
        mask = rng.random(img.shape[:2]) < 0.02
        img[mask] = rng.integers(0, 256, (mask.sum(), 3))
        images.append(img)
    table = shapes_scorer.score_batch(images, scenes[:100])
    assert table["overall"]["all_correct"] >= 0.95, shapes_scorer.format_table(table)


def test_noise_blank_and_mismatched_images_score_low(scenes):
    rng = np.random.default_rng(2)
    noise = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in scenes]
    blank = [np.zeros((32, 32, 3), np.uint8) for _ in scenes]
    shuffled = [shapes.render(s, 32) for s in scenes[1:] + scenes[:1]]
    for images in (noise, blank, shuffled):
        table = shapes_scorer.score_batch(images, scenes)
        assert table["overall"]["all_correct"] <= 0.05, shapes_scorer.format_table(table)
        assert table["two_objects"]["found"] <= 0.1
    blank_row = shapes_scorer.score_image(blank[0], scenes[0])
    assert not blank_row["found"] and not blank_row["all_correct"]


def test_score_image_fields_and_wrong_attributes():
    red_circle = shapes.ShapeObject("red", "circle", "large", 0.5, 0.5, 0.5)
    image = shapes.render(shapes.Scene((red_circle,)), 32)
    row = shapes_scorer.score_image(image, shapes.Scene((red_circle,)))
    assert row == {"colour": True, "shape": True, "size": True, "relation": None, "found": True,
                   "all_correct": True, "order_swapped": None, "attributes_swapped": None}
    for wrong, key in [
        ({"colour": "blue"}, "colour"), ({"shape": "square"}, "shape"), ({"size": "small"}, "size"),
    ]:
        other = dataclasses.replace(red_circle, **wrong)
        row = shapes_scorer.score_image(image, shapes.Scene((other,)))
        assert row[key] is False and row["all_correct"] is False
        assert all(row[k] for k in ("colour", "shape", "size") if k != key)


def test_relation_is_checked():
    a = shapes.ShapeObject("red", "circle", "small", 0.3, 0.25, 0.5)
    b = shapes.ShapeObject("blue", "square", "small", 0.3, 0.75, 0.5)
    image = shapes.render(shapes.Scene((a, b), "left"), 32)
    assert shapes_scorer.score_image(image, shapes.Scene((a, b), "left"))["all_correct"]
    row = shapes_scorer.score_image(image, shapes.Scene((a, b), "right"))
    assert row["found"] and row["shape"] and row["relation"] is False and not row["all_correct"]
    assert row["order_swapped"] and not row["attributes_swapped"]
    assert not shapes_scorer.score_image(image, shapes.Scene((a, b), "above"))["order_swapped"]  # axis
    # The blue object drawn as the red one's circle and the red one as the blue one's square.
    asked = shapes.Scene(
        (dataclasses.replace(a, shape="square"), dataclasses.replace(b, shape="circle")), "left"
    )
    row = shapes_scorer.score_image(image, asked)
    assert row["attributes_swapped"] and not row["shape"] and row["relation"] and not row["order_swapped"]
    table = shapes_scorer.score_batch([image, image], [asked, shapes.Scene((a, b), "right")])
    assert table["two_objects"]["order_swapped"] == 0.5 and table["two_objects"]["attributes_swapped"] == 0.5


def test_score_batch_length_mismatch():
    with pytest.raises(ValueError, match="2 images but 1 scenes"):
        shapes_scorer.score_batch([np.zeros((32, 32, 3), np.uint8)] * 2, [None])
