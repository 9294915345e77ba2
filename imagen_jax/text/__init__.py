"""Text side of Imagen: tokenizers, the Flax T5 encoder, Hugging Face checkpoint loading, embedding cache."""

from imagen_jax.text.build import build_text_encoder
from imagen_jax.text.embedding_cache import EmbeddingCache
from imagen_jax.text.encoder import TextEncoder, encode_tokens
from imagen_jax.text.hf_loader import load_t5_encoder
from imagen_jax.text.t5 import T5Config, T5Encoder
from imagen_jax.text.tokenizers import (
    ByT5Tokenizer,
    SentencePieceT5Tokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    make_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "ByT5Tokenizer",
    "EmbeddingCache",
    "SentencePieceT5Tokenizer",
    "SentencePieceTokenizer",
    "T5Config",
    "T5Encoder",
    "TextEncoder",
    "Tokenizer",
    "build_text_encoder",
    "encode_tokens",
    "load_t5_encoder",
    "make_tokenizer",
    "train_sentencepiece",
]
