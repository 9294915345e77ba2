"""Prompt -> fixed-length T5 token ids and mask.

Every tokenizer returns {"text_ids": int32 [B, max_length], "text_mask": bool [B, max_length]}: ids end
with EOS (1), padding is id 0 with mask False. Shared rules (in `Tokenizer.__call__`):
- a prompt longer than max_length is cut to max_length - 1 tokens plus EOS, with a warning naming it;
- an empty or whitespace-only prompt is the unconditional one: all pad ids, mask all False (no EOS), so
  it is exactly what classifier-free guidance's dropped text looks like;
- a non-string prompt raises TypeError (index and type), an empty prompt list ValueError.

Backends: transformers tokenizers for ByT5 (bytes + 3, no files) and for T5's SentencePiece vocabulary from
a `spiece.model` or a Hugging Face folder (the fast tokenizer when `tokenizer.json` exists); sentencepiece
itself for a vocabulary learned from a run's own captions (`train_sentencepiece`, `SentencePieceTokenizer`).
"""

from __future__ import annotations

import abc
import io
import os
import pathlib
import shutil
import tempfile
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from imagen_jax.errors import ConfigError, InputFileNotFoundError

PAD_ID = 0
EOS_ID = 1
UNK_ID = 2

# Checked against sentencepiece itself after loading (transformers has returned silent garbage for some
# ways of loading spiece.model; see shared/TRAPS.md).
_PROBE = "A cute corgi lives in a house made of sushi."


def _short(prompt: str, limit: int = 80) -> str:
    return prompt if len(prompt) <= limit else prompt[: limit - 3] + "..."


class Tokenizer(abc.ABC):
    """Batch of prompts -> {"text_ids", "text_mask"} numpy arrays of shape [B, max_length]."""

    max_length: int

    def __init__(self, max_length: int):
        if int(max_length) < 2:
            raise ConfigError(f"max_length must be >= 2 (one token plus EOS), got {max_length}.")
        self.max_length = int(max_length)

    @abc.abstractmethod
    def encode_batch(self, prompts: list[str]) -> list[list[int]]:
        """Token ids of each prompt, without EOS or padding."""

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (all below this)."""

    def __call__(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
        if isinstance(prompts, str):  # a bare string would otherwise tokenize letter by letter
            raise TypeError("prompts must be a sequence of strings, got a single str; wrap it in a list.")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts is empty; pass at least one prompt ('' is the unconditional one).")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt {i} is {type(prompt).__name__} ({prompt!r:.60}), expected str.")
        ids = np.full((len(prompts), self.max_length), PAD_ID, np.int32)
        mask = np.zeros((len(prompts), self.max_length), np.bool_)
        nonempty = [i for i, p in enumerate(prompts) if p.strip()]
        encoded = self.encode_batch([prompts[i] for i in nonempty]) if nonempty else []
        for i, tokens in zip(nonempty, encoded, strict=True):
            tokens = list(tokens) + [EOS_ID]
            if len(tokens) > self.max_length:
                warnings.warn(
                    f"prompt {i} {_short(prompts[i])!r} has {len(tokens)} tokens (with EOS), more than "
                    f"max_length={self.max_length}; truncated (EOS kept).",
                    stacklevel=2,
                )
                tokens = tokens[: self.max_length - 1] + [EOS_ID]
            ids[i, : len(tokens)] = tokens
            mask[i, : len(tokens)] = True
        return {"text_ids": ids, "text_mask": mask}


class HFTokenizer(Tokenizer):
    """Wraps a loaded transformers tokenizer whose pad id is 0 and EOS id is 1 (all T5 variants)."""

    def __init__(self, hf_tokenizer: Any, max_length: int, name: str = ""):
        super().__init__(max_length)
        if hf_tokenizer.pad_token_id != PAD_ID or hf_tokenizer.eos_token_id != EOS_ID:
            raise ConfigError(
                f"tokenizer {name or type(hf_tokenizer).__name__} has pad id {hf_tokenizer.pad_token_id} and "
                f"EOS id {hf_tokenizer.eos_token_id}; T5 encoders expect pad 0 and EOS 1."
            )
        self.hf_tokenizer = hf_tokenizer
        self.name = name

    def encode_batch(self, prompts: list[str]) -> list[list[int]]:
        return self.hf_tokenizer(prompts, add_special_tokens=False)["input_ids"]

    @property
    def vocab_size(self) -> int:
        return len(self.hf_tokenizer)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, max_length={self.max_length})"


class ByT5Tokenizer(HFTokenizer):
    """Byte-level tokenizer (UTF-8 bytes + 3): needs no files; the default for demos and tests."""

    def __init__(self, max_length: int = 128):
        from transformers import ByT5Tokenizer as _HFByT5

        super().__init__(_HFByT5(), max_length, name="byte")


def _check_against_sentencepiece(hf_tokenizer: Any, spiece_path: pathlib.Path) -> None:
    import sentencepiece as spm

    expected = spm.SentencePieceProcessor(model_file=str(spiece_path)).encode(_PROBE)
    got = hf_tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if list(got) != list(expected):
        raise RuntimeError(
            f"transformers tokenizer from {spiece_path} gives ids {got[:8]}... for a probe sentence but "
            f"sentencepiece gives {expected[:8]}...; check that sentencepiece and protobuf are installed."
        )


class SentencePieceT5Tokenizer(HFTokenizer):
    """T5 SentencePiece tokenizer from a `spiece.model` file.

    `T5Tokenizer(vocab_file=...)` silently returns wrong ids in transformers 5.x, so the file is loaded with
    `from_pretrained` on a temporary folder holding only a link to it, and checked against sentencepiece.
    """

    def __init__(self, spiece_path: str | os.PathLike, max_length: int = 128):
        from transformers import T5Tokenizer

        path = pathlib.Path(spiece_path)
        if not path.is_file():
            raise InputFileNotFoundError(
                f"SentencePiece model {path} not found; pass the path of a spiece.model."
            )
        with tempfile.TemporaryDirectory() as tmp:
            try:
                os.symlink(path.resolve(), os.path.join(tmp, "spiece.model"))
            except OSError:  # filesystems without symlinks
                shutil.copyfile(path, os.path.join(tmp, "spiece.model"))
            hf = T5Tokenizer.from_pretrained(tmp)  # reads the model into memory; the folder can go
        _check_against_sentencepiece(hf, path)
        super().__init__(hf, max_length, name=str(path))


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model read by sentencepiece itself, byte fallback included (transformers' T5
    tokenizer maps those characters to the unknown id): the vocabulary `train_sentencepiece` learns."""

    def __init__(self, model_path: str | os.PathLike, max_length: int = 128):
        import sentencepiece as spm

        super().__init__(max_length)
        self.path = pathlib.Path(model_path)
        if not self.path.is_file():
            raise InputFileNotFoundError(f"SentencePiece model {self.path} not found.")
        self.processor = spm.SentencePieceProcessor(model_file=str(self.path))
        ids = [self.processor.pad_id(), self.processor.eos_id(), self.processor.unk_id()]
        if ids != [PAD_ID, EOS_ID, UNK_ID]:
            raise ConfigError(
                f"SentencePiece model {self.path} has pad, EOS and unknown ids {ids}; T5 encoders expect "
                f"{[PAD_ID, EOS_ID, UNK_ID]}, as train_sentencepiece sets."
            )

    def encode_batch(self, prompts: list[str]) -> list[list[int]]:
        return self.processor.encode(prompts)

    @property
    def vocab_size(self) -> int:
        return int(self.processor.get_piece_size())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.path)!r}, max_length={self.max_length})"


def train_sentencepiece(
    texts: Sequence[str],
    model_path: str | os.PathLike,
    *,
    vocab_size: int,
    model_type: str = "bpe",
    normalization: str = "nmt_nfkc_cf",
) -> None:
    """Learns a SentencePiece vocabulary of at most `vocab_size` pieces from `texts` and writes it to
    `model_path` (whole, or not at all). Ids follow T5's: pad 0, EOS 1, unknown 2, no BOS. Byte fallback
    spells any character the texts never show as its UTF-8 bytes (256 of the pieces), so no prompt maps to
    the unknown id; `normalization` "nmt_nfkc_cf" also folds case. Deterministic for the same texts."""
    import sentencepiece as spm

    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts),
            model_writer=model,
            vocab_size=int(vocab_size),
            hard_vocab_limit=False,  # texts with fewer distinct pieces get a smaller vocabulary, no error
            model_type=model_type,
            normalization_rule_name=normalization,
            pad_id=PAD_ID,
            eos_id=EOS_ID,
            unk_id=UNK_ID,
            bos_id=-1,
            byte_fallback=True,
            character_coverage=1.0,
            num_threads=1,  # one thread: the same pieces on every run
            minloglevel=2,
        )
    except RuntimeError as e:
        if "smaller than required_chars" not in str(e):
            raise
        raise ConfigError(
            f"vocab_size {vocab_size} cannot hold pad, EOS, unknown, the 256 bytes and every distinct "
            f"character of the texts; raise it (sentencepiece: {str(e).split('] ')[-1]})"
        ) from None
    path = pathlib.Path(model_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(path)


def load_hf_tokenizer(folder: str | os.PathLike, max_length: int = 128) -> HFTokenizer:
    """The tokenizer of a Hugging Face T5 folder: fast (tokenizer.json) if present, else spiece.model."""
    folder = pathlib.Path(folder)
    if (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        return HFTokenizer(AutoTokenizer.from_pretrained(str(folder)), max_length, name=str(folder))
    if (folder / "spiece.model").is_file():
        return SentencePieceT5Tokenizer(folder / "spiece.model", max_length)
    raise InputFileNotFoundError(
        f"no tokenizer in {folder}: expected tokenizer.json or spiece.model. Download them with the "
        "checkpoint, or set the tokenizer to a spiece.model path or 'byte'."
    )


def make_tokenizer(name_or_path: str, max_length: int = 128) -> Tokenizer:
    """"byte" -> ByT5; a `*.model` file -> SentencePiece T5; a folder -> its Hugging Face tokenizer."""
    if name_or_path == "byte":
        return ByT5Tokenizer(max_length)
    path = pathlib.Path(os.path.expanduser(name_or_path))
    if path.is_file():
        return SentencePieceT5Tokenizer(path, max_length)
    if path.is_dir():
        return load_hf_tokenizer(path, max_length)
    raise InputFileNotFoundError(
        f"tokenizer {name_or_path!r} is neither 'byte' nor an existing spiece.model file or folder."
    )
