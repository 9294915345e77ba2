"""Tokenizers: known ids, fixed-length output, truncation warning, unconditional prompt, bad input, and a
SentencePiece vocabulary learned from captions."""

import shutil

import numpy as np
import pytest

from imagen_jax.errors import ConfigError
from imagen_jax.text.tokenizers import (
    ByT5Tokenizer,
    SentencePieceT5Tokenizer,
    SentencePieceTokenizer,
    make_tokenizer,
    train_sentencepiece,
)

CORGI = "A cute corgi lives in a house made of sushi."
CORGI_IDS = [71, 5295, 4301, 122, 23, 1342, 16, 3, 9, 629, 263, 13, 26297, 5, 1]


@pytest.fixture(scope="module")
def spiece(shared_dir):
    path = shared_dir / "data" / "t5_spiece.model"
    if not path.is_file():
        pytest.skip(f"{path} not found")
    return path


def test_sentencepiece_known_ids(spiece):
    tok = make_tokenizer(str(spiece), max_length=20)
    out = tok([CORGI, "Hello World!, how are you?"])
    assert out["text_ids"].dtype == np.int32 and out["text_mask"].dtype == np.bool_
    assert out["text_ids"].shape == (2, 20)
    assert out["text_ids"][0, :15].tolist() == CORGI_IDS and not out["text_ids"][0, 15:].any()
    assert out["text_mask"][0].tolist() == [True] * 15 + [False] * 5
    assert out["text_ids"][1, :9].tolist() == [8774, 1150, 55, 6, 149, 33, 25, 58, 1]


def test_sentencepiece_from_folder_with_other_files(spiece, tmp_path):
    # A folder holding spiece.model plus unrelated files still loads (the file is used alone).
    shutil.copyfile(spiece, tmp_path / "my.model")
    (tmp_path / "config.json").write_text("{}")
    tok = SentencePieceT5Tokenizer(tmp_path / "my.model", max_length=16)
    assert tok([CORGI])["text_ids"][0, :15].tolist() == CORGI_IDS
    shutil.copyfile(spiece, tmp_path / "spiece.model")
    assert make_tokenizer(str(tmp_path), 16)([CORGI])["text_ids"][0, :15].tolist() == CORGI_IDS


def test_byt5_known_ids():
    out = ByT5Tokenizer(max_length=8)(["héllo"])
    # UTF-8 bytes + 3: h=104, é=0xC3 0xA9, l=108, o=111; then EOS 1, pad 0.
    assert out["text_ids"][0].tolist() == [107, 198, 172, 111, 111, 114, 1, 0]
    assert out["text_mask"][0].tolist() == [True] * 7 + [False]


def test_truncation_warns_and_keeps_eos():
    tok = make_tokenizer("byte", max_length=6)
    with pytest.warns(UserWarning, match=r"prompt 1 'a long prompt' has 14 tokens.*max_length=6"):
        out = tok(["ok", "a long prompt"])
    assert out["text_ids"][1].tolist() == [100, 35, 111, 114, 113, 1]
    assert out["text_mask"][1].all()
    with pytest.warns(UserWarning, match=r"\.\.\.' has 1001 tokens"):  # huge prompts are shortened
        tok(["x" * 1000])


def test_empty_prompt_is_unconditional():
    out = make_tokenizer("byte", max_length=5)(["", "   ", "a"])
    assert not out["text_mask"][:2].any() and not out["text_ids"][:2].any()
    assert out["text_ids"][2].tolist() == [100, 1, 0, 0, 0]


def test_bad_input():
    tok = make_tokenizer("byte", max_length=8)
    with pytest.raises(TypeError, match="prompt 1 is int"):
        tok(["fine", 3])
    with pytest.raises(TypeError, match="prompt 0 is NoneType"):
        tok([None])
    with pytest.raises(TypeError, match="single str"):
        tok("a bare string")
    with pytest.raises(ValueError, match="empty"):
        tok([])
    with pytest.raises(FileNotFoundError, match="neither 'byte'"):
        make_tokenizer("/no/such/spiece.model", 8)
    with pytest.raises(ConfigError, match="max_length"):
        make_tokenizer("byte", 1)


def test_a_vocabulary_learned_from_captions(tmp_path):
    colours, shapes = ("red", "green", "blue", "yellow"), ("circle", "square", "triangle")
    texts = [f"a {size} {c} {s}" for size in ("small", "large") for c in colours for s in shapes] * 20
    train_sentencepiece(texts, tmp_path / "a" / "spiece.model", vocab_size=400)
    train_sentencepiece(texts, tmp_path / "b.model", vocab_size=400)
    # Deterministic: the same texts give the same model, byte for byte.
    assert (tmp_path / "a" / "spiece.model").read_bytes() == (tmp_path / "b.model").read_bytes()
    assert not list((tmp_path / "a").glob("*.tmp"))
    tok = SentencePieceTokenizer(tmp_path / "a" / "spiece.model", max_length=12)
    assert 259 < tok.vocab_size <= 400
    ids = tok(["a small blue square", "A SMALL Blue square", "", "blue?"])
    words = ids["text_ids"][0][ids["text_mask"][0]].tolist()
    assert len(words) == 5 and words[-1] == 1  # each word one piece, then EOS
    assert ids["text_ids"][1].tolist() == ids["text_ids"][0].tolist()  # case folded
    assert not ids["text_mask"][2].any()  # the unconditional prompt
    # Characters the captions never show are spelt in bytes (ids 3..258), never the unknown id 2.
    blue_q = ids["text_ids"][3][ids["text_mask"][3]].tolist()
    assert blue_q[0] == words[2] and 3 <= blue_q[1] < 259 and 2 not in blue_q
    assert "SentencePieceTokenizer(" in repr(tok) and tok.processor.pad_id() == 0
    with pytest.raises(ConfigError, match="vocab_size 270 cannot hold .* every distinct character"):
        train_sentencepiece(texts, tmp_path / "c.model", vocab_size=270)
    with pytest.raises(FileNotFoundError, match="not found"):
        SentencePieceTokenizer(tmp_path / "missing.model")
