"""The frozen text encoder as the rest of imagen_jax sees it: tokenizer + T5 module + params.

`imagen_jax.text.build.build_text_encoder(config.text)` reads:
  encoder     "random" (a seeded random T5 sized by `t5`, for demos/tests, no download), "pretrain" (that
              T5 pretrained at the start of the run on its captions, `pretrain`; read from the run's
              workdir) or a Hugging Face folder / hub id in the local cache (`hf_loader.load_t5_encoder`)
  tokenizer   "byte", "captions" (a SentencePiece vocabulary learned from the run's training captions at the
              start of the run, `learned_tokenizer`; read from the run's workdir), a spiece.model path or
              a folder; for a checkpoint, "" / None = the checkpoint's own
  max_length  tokens per prompt, EOS included
  dtype       "float32" | "bfloat16": compute dtype and dtype the parameters are stored in
  seed, t5    (random, pretrain) PRNG seed and T5 sizes: vocab_size, d_model, d_kv, d_ff, num_heads,
              num_layers, feed_forward
  pretrain    (pretrain; read by `imagen_jax.training.text_pretraining`) steps, batch, learning rate,
              span-corruption noise density and mean span length, decoder layers, time budget
`encode_tokens` is the pure function to call inside jitted steps; `TextEncoder.encode` is for prompts.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from imagen_jax.errors import ConfigError
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.text.t5 import T5Config, T5Encoder
from imagen_jax.text.tokenizers import Tokenizer

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def parse_dtype(dtype: Any) -> Any:
    """ "float32" / "bfloat16" / a numpy-compatible dtype -> jnp dtype; unknown names raise ValueError."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ConfigError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}.")
        return _DTYPES[dtype]
    return jnp.dtype(dtype).type


def encode_tokens(module: T5Encoder, params: Any, text_ids: jax.Array, text_mask: jax.Array) -> jax.Array:
    """T5 embeddings [B, L, D] float32 with padded positions zeroed. Pure: safe inside jit and grads
    (wrap with jax.lax.stop_gradient at the call site if params are traced)."""
    emb = module.apply({"params": params}, text_ids, text_mask)
    return emb.astype(jnp.float32) * text_mask[..., None].astype(jnp.float32)


def init_params(
    module: T5Encoder, rng: jax.Array, mesh: Mesh | None = None, rules: Sequence[Any] | None = None
) -> Any:
    """Random parameters (unboxed). With a mesh, each array is created already sharded by the logical
    annotations and `rules`, so no full copy exists on one device."""
    ids = jnp.zeros((1, 8), jnp.int32)
    mask = jnp.ones((1, 8), jnp.bool_)
    init = lambda r: nn.unbox(module.init(r, ids, mask)["params"])
    if mesh is None:
        return jax.jit(init)(rng)
    abstract = jax.eval_shape(lambda r: module.init(r, ids, mask)["params"], rng)
    return jax.jit(init, out_shardings=mesh_lib.tree_shardings(abstract, mesh, rules))(rng)


def param_logical_axes(module: T5Encoder) -> Any:
    """The tree of logical axis names (PartitionSpec of names) of the module's parameters."""
    ids = jnp.zeros((1, 8), jnp.int32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids, ids > 0)["params"])
    return nn.get_partition_spec(abstract)


@dataclasses.dataclass(frozen=True, eq=False)
class TextEncoder:
    """A tokenizer, a T5 module and its (unboxed) params; `embed_dim` is the embedding width."""

    module: T5Encoder
    tokenizer: Tokenizer
    params: Any
    embed_dim: int

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    @functools.cached_property
    def _encode_jit(self):
        # One jitted function; jax caches one compilation per batch shape.
        return jax.jit(functools.partial(encode_tokens, self.module))

    def encode_ids(self, text_ids: Any, text_mask: Any) -> jax.Array:
        """Embeddings [B, L, D] float32 (padding zeroed) of already tokenized prompts."""
        return self._encode_jit(self.params, jnp.asarray(text_ids), jnp.asarray(text_mask))

    def encode(self, prompts: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Prompts -> (embeddings [B, max_length, D] float32, padding zeroed; mask bool [B, max_length])."""
        tokens = self.tokenizer(prompts)
        mask = jnp.asarray(tokens["text_mask"])
        return self.encode_ids(tokens["text_ids"], mask), mask


def t5_config_from_dict(t5: Any) -> T5Config:
    """T5Config from a config sub-dict (ConfigDict or dict) holding some of T5Config's fields."""
    fields = {f.name for f in dataclasses.fields(T5Config)}
    values = dict(t5.items()) if hasattr(t5, "items") else dict(t5)
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"text.t5 has unknown keys {unknown}; allowed: {sorted(fields)}.")
    return T5Config(**values)


def check_tokenizer_vocab(tokenizer: Tokenizer, cfg: T5Config) -> None:
    """Raises ValueError when the tokenizer can emit ids beyond the embedding table."""
    # Ids beyond the embedding table would be silently clamped by jnp.take: catch the mismatch early.
    size = tokenizer.vocab_size
    if size > cfg.vocab_size:
        raise ConfigError(
            f"tokenizer {tokenizer!r} has {size} tokens but the T5 vocab_size is {cfg.vocab_size}; "
            "use a tokenizer matching the encoder (ByT5 needs vocab_size >= 384, SentencePiece T5 32128)."
        )


def as_numpy(emb: jax.Array, mask: jax.Array) -> tuple[np.ndarray, np.ndarray]:
    """Host copies of (embeddings, mask), e.g. for caching."""
    return np.asarray(jax.device_get(emb)), np.asarray(jax.device_get(mask))
