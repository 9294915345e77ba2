"""Procedural shapes scenes: determinism, captions, geometry, rendering and low/high-res consistency."""

import re
import string
import time

import numpy as np
import pytest

from imagen_jax.data import shapes


def test_make_example_is_deterministic_per_seed_split_index():
    a = shapes.make_example(0, "train", 7, (32, 64))
    b = shapes.make_example(0, "train", 7, (32, 64))
    assert a["caption"] == b["caption"] and a["scene"] == b["scene"]
    np.testing.assert_array_equal(a["image_32"], b["image_32"])
    np.testing.assert_array_equal(a["image"], a["image_32"])
    assert a["image_64"].shape == (64, 64, 3) and a["image_64"].dtype == np.uint8


def test_splits_seeds_and_indices_differ():
    def scenes(seed, split):
        return [shapes.make_example(seed, split, i)["scene"] for i in range(20)]

    train, val, test = scenes(0, "train"), scenes(0, "validation"), scenes(0, "test")
    assert len(set(train)) == 20
    assert not set(train) & set(val) and not set(train) & set(test) and not set(val) & set(test)
    assert not set(train) & set(scenes(1, "train"))


def test_scene_json_round_trip():
    scene = shapes.sample_scene(np.random.default_rng(3), p_two=1.0)
    assert shapes.Scene.from_json(scene.to_json()) == scene
    assert shapes.Scene.from_json(scene.to_json().encode()) == scene


def test_geometry_relation_and_no_overlap():
    rng = np.random.default_rng(0)
    for _ in range(500):
        scene = shapes.sample_scene(rng, p_two=1.0)
        a, b = scene.objects
        assert a.colour != b.colour
        assert shapes.relation_holds(a, b, scene.relation)
        # Clearly in the relation: main-axis gap beats the cross-axis offset at least 3 to 1.
        dx, dy = abs(a.cx - b.cx), abs(a.cy - b.cy)
        main, cross = (dx, dy) if scene.relation in ("left", "right") else (dy, dx)
        assert main >= 3 * cross - 1e-9
        assert main >= (a.extent + b.extent) / 2 + 0.05  # boxes do not overlap
        for o in scene.objects:
            lo, hi = shapes.SIZE_RANGES[o.size]
            assert lo <= o.extent <= hi
            assert o.extent / 2 <= o.cx <= 1 - o.extent / 2 and o.extent / 2 <= o.cy <= 1 - o.extent / 2


def test_object_tags_mark_each_object_word_with_its_place_and_attributes():
    rng = np.random.default_rng(5)
    seen = set()
    names = shapes.OBJECT_TAGS
    for wording in shapes.WORDINGS:
        for _ in range(200):
            scene = shapes.sample_scene(rng, p_two=0.7)
            caption = shapes.caption_for(scene, rng, wording)
            spans = shapes.object_tags(caption, scene)
            # Three words per object phrase, in the phrase's order, each with its object's tags.
            assert len(spans) == 3 * len(scene.objects)
            for k, obj in enumerate(scene.objects):
                words = spans[3 * k : 3 * k + 3]
                assert [caption[a:b] for a, b, _ in words] == obj.describe().split()
                (tags,) = {tags for _, _, tags in words}
                tag = dict(zip(names, tags, strict=True))
                # Its attributes, one-hot.
                assert [n for n in names if "=" in n and tag[n] == 1] == [
                    f"colour={obj.colour}", f"shape={obj.shape}", f"size={obj.size}"]
                assert all(tag[n] == 0 for n in names if "=" in n and n.split("=")[1] not in (
                    obj.colour, obj.shape, obj.size))
                if len(scene.objects) == 1:
                    assert tags[:3] == (-1, -1, -1)
                    continue
                other = scene.objects[1 - k]
                # first_in_image: the geometry's left (left/right) or top (above/below) object.
                horizontal = scene.relation in ("left", "right")
                first = int(obj.cx < other.cx if horizontal else obj.cy < other.cy)
                assert tag["first_in_image"] == first
                named_first = caption.index(obj.describe()) < caption.index(other.describe())
                assert tag["named_first"] == int(named_first)
                assert tag["relation_first"] == int(scene.relation in ("left", "above"))
                seen.add((tag["named_first"], first))
    # Objects named first are either one in the image: the exclusive-or of naming order and relation.
    assert seen == {(1, 1), (1, 0), (0, 1), (0, 0)}
    square = shapes.ShapeObject("red", "square", "small", 0.3, 0.8, 0.5)
    circle = shapes.ShapeObject("blue", "circle", "large", 0.5, 0.3, 0.5)
    caption = "a small red square right of a large blue circle"
    spans = shapes.object_tags(caption, shapes.Scene((square, circle), "right"))
    assert [caption[a:b] for a, b, _ in spans] == ["small", "red", "square", "large", "blue", "circle"]
    assert [tags[:3] for _, _, tags in spans] == [(0, 1, 0)] * 3 + [(1, 0, 0)] * 3
    with pytest.raises(ValueError, match="does not name 'small red square' exactly once"):
        shapes.object_tags("a red square right of a blue circle", shapes.Scene((square, circle), "right"))


def test_captions_mention_every_attribute():
    rng = np.random.default_rng(1)
    counts = {1: 0, 2: 0}
    for _ in range(300):
        scene = shapes.sample_scene(rng, p_two=0.5)
        caption = shapes.caption_for(scene, rng)
        counts[len(scene.objects)] += 1
        pos = 0
        for o in scene.objects:  # in order: first object described first
            pos = caption.index(o.describe(), pos)
        if scene.relation:
            assert any(p in caption for p in shapes.RELATION_PHRASES[scene.relation])
    assert counts[1] > 100 and counts[2] > 100


def _template_pattern(template: str) -> re.Pattern:
    """A regex matching exactly the captions `template` can produce."""
    obj = "(small|large) (" + "|".join(shapes.COLOURS) + ") (" + "|".join(shapes.SHAPES) + ")"
    rel = "(" + "|".join(p for ps in shapes.RELATION_PHRASES.values() for p in ps) + ")"
    parts = re.split(r"(\{a\}|\{b\}|\{rel\})", template)
    fill = {"{a}": obj, "{b}": obj, "{rel}": rel}
    return re.compile("".join(fill.get(part, re.escape(part)) for part in parts))


def test_heldout_wordings_never_appear_in_the_training_stream():
    train_one, train_two = shapes.caption_templates("standard")
    held_one, held_two = shapes.caption_templates("heldout")
    assert not set(train_one + train_two) & set(held_one + held_two)
    held = [_template_pattern(t) for t in held_one + held_two]
    train = [_template_pattern(t) for t in train_one + train_two]
    # Every training caption, as the dataset generates them, is in the training grammar and matches no
    # held-out template (so no training caption could teach a held-out framing verbatim).
    for i in range(3000):
        caption = shapes.make_example(0, "train", i, 8, p_two=0.65)["caption"]
        assert any(p.fullmatch(caption) for p in train), caption
        assert not any(p.fullmatch(caption) for p in held), caption
    # The held-out captions caption the very same scenes, in held-out framings only, and carry the same
    # object and relation phrases in the same order.
    standard = shapes.eval_set(400, seed=3, wording="standard")
    heldout = shapes.eval_set(400, seed=3, wording="heldout")
    used = set()
    for (_, scene_s), (cap_h, scene_h) in zip(standard, heldout, strict=True):
        assert scene_s == scene_h
        assert not any(p.fullmatch(cap_h) for p in train), cap_h
        matched = [t for t, p in zip(held_one + held_two, held, strict=True) if p.fullmatch(cap_h)]
        assert len(matched) == 1, cap_h
        used.add(matched[0])
        pos = 0
        for o in scene_h.objects:
            pos = cap_h.index(o.describe(), pos)
        if scene_h.relation:
            assert any(p in cap_h for p in shapes.RELATION_PHRASES[scene_h.relation])
    assert used == set(held_one + held_two)  # every held-out framing is exercised
    with pytest.raises(ValueError, match="unknown caption wording 'casual'"):
        shapes.eval_set(1, wording="casual")


def test_made_up_words_frame_the_phrases_and_never_use_a_grammar_word():
    held_one, held_two = shapes.caption_templates("heldout")
    held_words = {w.strip(",:?") for t in held_one + held_two for w in t.split()} - {"{a}", "{b}", "{rel}"}
    standard = [shapes.make_example(0, "train", i, 8, p_two=0.65)["caption"] for i in range(400)]
    inserted = 0
    for i in range(400):
        ex = shapes.make_example(0, "train", i, 8, p_two=0.65, made_up_prob=0.5, made_up_max=3)
        scene, caption = shapes.Scene.from_json(ex["scene"]), ex["caption"]
        # The scene and the grammar's caption are those of made_up_prob=0; the made-up words only add.
        assert scene == shapes.Scene.from_json(shapes.make_example(0, "train", i, 8, p_two=0.65)["scene"])
        added = caption.split()
        for word in standard[i].split():
            added.remove(word)
        assert len(added) <= 3
        inserted += bool(added)
        for word in added:
            assert word.rstrip(string.punctuation).isalpha() and len(word.rstrip(string.punctuation)) >= 2
            assert word.rstrip(string.punctuation) not in held_words | set(standard[i].split()), word
        # Object and relation phrases stay verbatim, so the tags still find every word of each object.
        tags = shapes.object_tags(caption, scene)
        assert len(tags) == 3 * len(scene.objects)
        if scene.relation:
            assert any(p in caption for p in shapes.RELATION_PHRASES[scene.relation]), caption
    assert 150 < inserted < 250  # about half of the captions
    # Inserted anywhere outside the phrases: at the start, inside the framing, between phrases, at the end.
    scene = shapes.Scene(
        (shapes.ShapeObject("red", "circle", "small", 0.3, 0.5, 0.2),
         shapes.ShapeObject("blue", "square", "large", 0.7, 0.5, 0.3)), "left")
    caption = "there is a small red circle to the left of a large blue square"
    seen = set()
    for seed in range(200):
        out = shapes.with_made_up_words(caption, scene, np.random.default_rng(seed), 1)
        words, rest = out.split(), caption.split()
        at = next((k for k, (a, b) in enumerate(zip(words, rest, strict=False)) if a != b), len(rest))
        assert words[:at] + words[at + 1:] == rest, out
        seen.add(at)
    # Boundaries outside the phrases: before "there", "is", "a", "small", "to", "a", "large", and the end.
    assert seen == {0, 1, 2, 3, 6, 10, 11, 14}
    # The generated dataset's name says so: its files are never shared with another setting's.
    from imagen_jax.data.shapes_tfds import config_for

    assert config_for(32, num_train=8, num_eval=2).name == "r32_n8_e2_s0_p50"
    with_words = config_for(32, num_train=8, num_eval=2, made_up_prob=0.3, made_up_max=2)
    assert with_words.name == "r32_n8_e2_s0_p50_m30x2"


def test_render_colours_and_areas():
    obj = shapes.ShapeObject("red", "square", "large", 0.5, 0.5, 0.5)
    img = shapes.render(shapes.Scene((obj,)), 32)
    assert tuple(img[16, 16]) == shapes.PALETTE["red"]
    assert tuple(img[0, 0]) == shapes.BACKGROUND
    for shape, fill in shapes.FILL_RATIO.items():
        scene = shapes.Scene((shapes.ShapeObject("white", shape, "large", 0.5, 0.5, 0.5),))
        coverage = shapes.render(scene, 64)[..., 0].astype(float).sum() / 245
        assert coverage == pytest.approx(fill * 32 * 32, rel=0.03), shape


def test_low_and_high_res_are_consistent():
    for i in range(10):
        ex = shapes.make_example(5, "train", i, (32, 128))
        hi = ex["image_128"].astype(np.float32).reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
        # Same scene, both anti-aliased: differences are sampling noise on edge pixels only
        # (4x4 vs 16x16 samples per low-res pixel, at most ~3/16 of a colour step).
        assert np.abs(hi - ex["image_32"]).mean() < 2.0
        assert np.abs(hi - ex["image_32"]).max() < 0.2 * 255


def test_eval_set_matches_examples_and_is_fast_to_render():
    pairs = shapes.eval_set(5, seed=2)
    for i, (caption, scene) in enumerate(pairs):
        ex = shapes.make_example(2, "test", i)
        assert ex["caption"] == caption and shapes.Scene.from_json(ex["scene"]) == scene
    scenes = [shapes.sample_scene(np.random.default_rng(i)) for i in range(500)]
    start = time.perf_counter()
    for s in scenes:
        shapes.render(s, 32)
    # 50k renders must take well under a minute: < 1 ms each, with slack for a shared machine.
    assert (time.perf_counter() - start) / len(scenes) < 1e-3


@pytest.mark.parametrize("variant", ["demo", "words"])
def test_captions_read_as_word_pieces_whatever_frames_them(variant, shared_dir, tmp_path):
    """The demo's vocabulary learned from the training captions, and T5's (the words variant)."""
    from configs.shapes import get_config
    from imagen_jax.text.tokenizers import SentencePieceTokenizer, make_tokenizer, train_sentencepiece

    text = get_config(variant).text
    if variant == "demo":
        assert text.tokenizer == "captions"
        training = [caption for caption, _ in shapes.eval_set(3000, split="train", p_two=0.65)]
        train_sentencepiece(training, tmp_path / "spiece.model", vocab_size=text.learned_tokenizer.vocab_size)
        tokenizer = SentencePieceTokenizer(tmp_path / "spiece.model", text.max_length)
        for word in (*shapes.COLOURS, *shapes.SHAPES, *shapes.SIZES, "left", "above", "below", "beneath"):
            assert len(tokenizer.processor.encode(word)) == 1, word
    else:
        tokenizer = make_tokenizer(str(shared_dir / "data" / "t5_spiece.model"), text.max_length)
    captions = [caption for w in shapes.WORDINGS for caption, _ in shapes.eval_set(300, seed=4, wording=w)]
    tokens = tokenizer(captions)
    lengths = tokens["text_mask"].sum(axis=1)
    assert lengths.max() < text.max_length  # nothing truncated: every caption ends with its EOS
    assert tokens["text_ids"][np.arange(len(captions)), lengths - 1].tolist() == [1] * len(captions)
    assert tokens["text_ids"].max() < text.t5.vocab_size
    # An object phrase is the same pieces under every framing (bytes too, but here no piece of a framing
    # word can be part of a colour word).
    def pieces(text):
        ids = tokenizer([text])["text_ids"][0]
        return ids[ids > 1].tolist()

    framings = [t for w in shapes.WORDINGS for t in shapes.caption_templates(w)[0]]
    for colour in shapes.COLOURS:
        phrase = pieces(f"small {colour} square")
        for framing in framings:
            caption = pieces(framing.format(a=f"small {colour} square"))
            assert any(caption[i : i + len(phrase)] == phrase for i in range(len(caption))), (framing, colour)
