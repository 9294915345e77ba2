"""`build_text_encoder(config.text)`: the seeded random T5 or a Hugging Face checkpoint, by name.

Its own module so that `encoder` (the TextEncoder type) and `hf_loader` (which builds one) import
downward only; the keys it reads are listed in `imagen_jax.text.encoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import Mesh

from imagen_jax.text.encoder import (
    TextEncoder,
    check_tokenizer_vocab,
    init_params,
    parse_dtype,
    t5_config_from_dict,
)
from imagen_jax.text.t5 import T5Encoder
from imagen_jax.text.tokenizers import make_tokenizer


def build_text_encoder(
    text_config: Any, mesh: Mesh | None = None, rules: Sequence[Any] | None = None
) -> TextEncoder:
    """The text encoder selected by `text_config` (see the module docstring for the keys). With a mesh,
    parameters are created / loaded already sharded by their logical axes and `rules`."""
    dtype = parse_dtype(text_config.get("dtype", "float32"))
    max_length = int(text_config.get("max_length", 128))
    encoder = str(text_config.encoder)
    tokenizer_name = text_config.get("tokenizer", None)
    if encoder == "random":
        cfg = t5_config_from_dict(text_config.t5)
        tokenizer = make_tokenizer(tokenizer_name or "byte", max_length)
        check_tokenizer_vocab(tokenizer, cfg)
        module = T5Encoder(cfg, dtype=dtype, param_dtype=dtype)
        params = init_params(module, jax.random.PRNGKey(int(text_config.get("seed", 0))), mesh, rules)
        return TextEncoder(module, tokenizer, params, cfg.d_model)
    from imagen_jax.text.hf_loader import load_t5_encoder  # imports safetensors only when needed

    loaded = load_t5_encoder(
        encoder, dtype=dtype, mesh=mesh, rules=rules, max_length=max_length, tokenizer=tokenizer_name or None
    )
    check_tokenizer_vocab(loaded.tokenizer, loaded.module.config)
    return loaded
