"""`build_text_encoder(config.text)`: the seeded random T5, the T5 pretrained in the run, or a Hugging Face
checkpoint, by name; `build_tokenizer(config.text)`: its tokenizer, including one learned in the run.

Its own module so that `encoder` (the TextEncoder type) and `hf_loader` (which builds one) import
downward only; the keys it reads are listed in `imagen_jax.text.encoder`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import jax
from etils import epath
from jax.sharding import Mesh

from imagen_jax.errors import ConfigError
from imagen_jax.text.encoder import (
    TextEncoder,
    check_tokenizer_vocab,
    init_params,
    parse_dtype,
    t5_config_from_dict,
)
from imagen_jax.text.t5 import T5Encoder
from imagen_jax.text.tokenizers import SentencePieceTokenizer, Tokenizer, make_tokenizer

# `text.encoder` value of a T5 pretrained at the start of the run (`imagen_jax.text.pretrain`) and kept,
# as a Hugging Face folder, in the run's workdir.
PRETRAINED_IN_RUN = "pretrain"


def pretrained_folder(workdir: str | epath.PathLike) -> epath.Path:
    """Where a run with `text.encoder="pretrain"` keeps its pretrained T5 (a Hugging Face folder)."""
    return epath.Path(workdir) / "text_encoder"


# `text.tokenizer` value of a SentencePiece vocabulary learned from the run's training captions at its
# start (`imagen_jax.training.text_pretraining`), kept in the run's workdir.
LEARNED_TOKENIZER = "captions"


def learned_tokenizer_file(workdir: str | epath.PathLike) -> epath.Path:
    """Where a run with `text.tokenizer="captions"` keeps the SentencePiece model it learned."""
    return epath.Path(workdir) / "tokenizer" / "spiece.model"


def _run_file(what: str, workdir: str | epath.PathLike | None, path_in: Any, made_by: str) -> str:
    """`path_in(workdir)`, a file a run writes into its workdir, as a local path; a clear error when there
    is no workdir or no file."""
    if workdir is None:
        raise ConfigError(f"{what} from its workdir, and none was given; pass the run's workdir.")
    path = path_in(workdir)
    if not path.exists():
        raise ConfigError(
            f"{what}, and {path} does not exist: train.py {made_by} before the U-Net trains; to sample, "
            "pass the workdir of the run that trained."
        )
    if "://" in str(path):
        raise ConfigError(
            f"{path}: {what} from local folders only; copy the run's workdir to a local folder to sample."
        )
    return str(path)


def build_tokenizer(text_config: Any, workdir: str | epath.PathLike | None = None) -> Tokenizer | None:
    """The tokenizer `text_config.tokenizer` names ("captions": the one learned in the run at `workdir`);
    None for "" (a checkpoint's own, which the loader reads)."""
    name = text_config.get("tokenizer", None)
    max_length = int(text_config.get("max_length", 128))
    if name == LEARNED_TOKENIZER:
        what = f"config.text.tokenizer={LEARNED_TOKENIZER!r} reads the vocabulary a run learned from captions"
        path = _run_file(what, workdir, learned_tokenizer_file, "learns it")
        return SentencePieceTokenizer(path, max_length)
    if not name and str(text_config.encoder) in ("random", PRETRAINED_IN_RUN):
        name = "byte"
    return make_tokenizer(name, max_length) if name else None


def build_text_encoder(
    text_config: Any,
    mesh: Mesh | None = None,
    rules: Sequence[Any] | None = None,
    workdir: str | epath.PathLike | None = None,
) -> TextEncoder:
    """The text encoder selected by `text_config` (see the module docstring for the keys). With a mesh,
    parameters are created / loaded already sharded by their logical axes and `rules`. `workdir` is the
    run's, where `encoder="pretrain"` finds its pretrained T5."""
    dtype = parse_dtype(text_config.get("dtype", "float32"))
    max_length = int(text_config.get("max_length", 128))
    encoder = str(text_config.encoder)
    tokenizer = build_tokenizer(text_config, workdir)
    if encoder == "random":
        cfg = t5_config_from_dict(text_config.t5)
        check_tokenizer_vocab(tokenizer, cfg)
        module = T5Encoder(cfg, dtype=dtype, param_dtype=dtype)
        params = init_params(module, jax.random.PRNGKey(int(text_config.get("seed", 0))), mesh, rules)
        return TextEncoder(module, tokenizer, params, cfg.d_model)
    if encoder == PRETRAINED_IN_RUN:
        what = f"config.text.encoder={PRETRAINED_IN_RUN!r} loads the T5 pretrained at the start of a run"
        config_file = _run_file(what, workdir, lambda w: pretrained_folder(w) / "config.json", "pretrains it")
        encoder = os.path.dirname(config_file)
    from imagen_jax.text.hf_loader import load_t5_encoder  # imports safetensors only when needed

    loaded = load_t5_encoder(
        encoder, dtype=dtype, mesh=mesh, rules=rules, max_length=max_length, tokenizer=tokenizer
    )
    check_tokenizer_vocab(loaded.tokenizer, loaded.module.config)
    return loaded
