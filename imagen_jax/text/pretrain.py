"""Pretrains a small T5 encoder on captions with T5's span-corruption objective (and, optionally, a
per-token tagging loss); saves it for `hf_loader`.

Imagen's lesson is that a frozen text encoder *pretrained* on text carries the language; a seeded random
T5 gives the diffusion model little more than token identities. This module gives the CPU demo's tiny T5
a few minutes of real pretraining on the captions themselves.

Objective (Raffel et al. 2020, section 3.1.4): about 15% of a caption's tokens are dropped in spans of
mean length 3; the encoder reads the caption with each dropped span replaced by one sentinel id, and the
decoder predicts, for each span in order, its sentinel followed by the dropped tokens:

  ids       a   s m a l l   r e d         (one token per byte with the byte tokenizer)
  inputs    a <S0> a l l   r e <S1> </s>
  targets   <S0> s m <S1> d </s>

Tags (optional, `tag_weight` > 0): the encoder also reads each whole caption, and a linear head on each
of its outputs predicts 0/1 tags the data source gives for some of its words, e.g. for the shapes scenes
whether the word's object is the left or top one in the image (`data.shapes.object_tags`). That fact is an
exclusive-or of the caption's word order and its relation word: a sequence-level objective (restating the
scene in image order) never found it in thousands of steps, while a loss on each word's own output, with
the two facts it combines as tags beside it, learns it in a few hundred (docs/shapes_demo.md). Span
corruption, on every row still, keeps the words' identities, which the tags alone let the encoder forget.

Sentinel k is id vocab_size - 1 - k, counting down from the top of the vocabulary (ByT5 with 384 ids
emits bytes as 3..258, so 259..383 are free). The decoder (causal, cross-attending to the encoder) exists
only for this loss: `pretrain_t5` returns the encoder's parameters, and `save_encoder` writes them as a
Hugging Face T5 encoder folder that `hf_loader.load_t5_encoder` loads like a published checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import shutil
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from imagen_jax.errors import ConfigError, NonFiniteError
from imagen_jax.text.encoder import check_tokenizer_vocab
from imagen_jax.text.hf_loader import hf_param_names
from imagen_jax.text.t5 import T5Config, T5Encoder, T5EncoderDecoder
from imagen_jax.text.tokenizers import EOS_ID, PAD_ID, Tokenizer

log = logging.getLogger("imagen_jax")

_TOKENIZE_CHUNK = 4096  # captions tokenized per call: bounds the [chunk, max_length] temporary


# ---------------------------------------------------------------------------------------------------
# Span corruption (host side, numpy)
# ---------------------------------------------------------------------------------------------------


def check_noise_args(noise_density: float, mean_span_length: float) -> None:
    """ConfigError unless 0 < noise_density < 1 and mean_span_length >= 1."""
    if not 0.0 < noise_density < 1.0:
        raise ConfigError(f"noise_density must be in (0, 1), got {noise_density}.")
    if mean_span_length < 1.0:
        raise ConfigError(f"mean_span_length must be >= 1, got {mean_span_length}.")


def check_loss_weights(span_weight: float, tag_weight: float) -> None:
    """ConfigError unless both weights are >= 0 and one is > 0."""
    for name, weight in (("span_weight", span_weight), ("tag_weight", tag_weight)):
        if not weight >= 0.0:
            raise ConfigError(f"{name}={weight} must be >= 0 (0 = without that loss).")
    if span_weight == 0 and tag_weight == 0:
        raise ConfigError("span_weight and tag_weight are both 0: pretraining would learn nothing.")


def _span_counts(length: int, noise_density: float, mean_span_length: float) -> tuple[int, int]:
    """(noise tokens, noise spans) for a sequence of `length` tokens; (0, 0) when length < 2."""
    if length < 2:  # no room for both a kept and a dropped token (T5 leaves such sequences intact)
        return 0, 0
    num_noise = min(max(round(length * noise_density), 1), length - 1)
    num_spans = max(1, round(num_noise / mean_span_length))
    # Every span needs at least one noise token and one kept token before it.
    return num_noise, min(num_spans, num_noise, length - num_noise)


def _random_composition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """`total` written as `parts` positive integers, uniformly over all such ordered splits."""
    cuts = np.sort(rng.choice(total - 1, parts - 1, replace=False) + 1)
    return np.diff(np.concatenate([[0], cuts, [total]]))


def random_spans_noise_mask(
    length: int,
    noise_density: float,
    mean_span_length: float,
    rng: np.random.Generator,
    *,
    random_roll: bool = False,
) -> np.ndarray:
    """T5's noise mask: bool [length], True = dropped. round(length * noise_density) tokens (at least 1,
    at most length - 1) in max(1, round(noise / mean_span_length)) spans; span lengths and the kept runs
    between them are random; the mask starts with a kept run and alternates kept / noise, so the last
    span always ends the sequence.

    random_roll (T5's option of the same name): rotate the mask by a random offset, so noise can start
    the sequence and the end is not always dropped; a span crossing the end then wraps around and
    becomes two (one more sentinel). Short captions have one span, which without the roll always is the
    caption's last ~15%.
    """
    check_noise_args(noise_density, mean_span_length)
    mask = np.zeros(length, np.bool_)
    num_noise, num_spans = _span_counts(length, noise_density, mean_span_length)
    if num_spans == 0:
        return mask
    noise_lengths = _random_composition(num_noise, num_spans, rng)
    kept_lengths = _random_composition(length - num_noise, num_spans, rng)
    start = 0
    for kept, noise in zip(kept_lengths, noise_lengths, strict=True):
        start += kept
        mask[start : start + noise] = True
        start += noise
    return np.roll(mask, rng.integers(length)) if random_roll else mask


def span_corruption(
    ids: np.ndarray,
    rng: np.random.Generator,
    *,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    vocab_size: int,
    random_roll: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) int32 for one sequence of real token ids (no pad, no EOS): inputs = ids with each
    noise span replaced by its sentinel (vocab_size - 1 - span index); targets = each span's sentinel and
    tokens, in order. Both end with EOS. random_roll: see `random_spans_noise_mask`."""
    ids = np.asarray(ids)
    if ids.ndim != 1:
        raise ValueError(f"span_corruption takes one 1-D sequence of ids, got shape {ids.shape}.")
    if ids.size and ids.min() <= max(PAD_ID, EOS_ID):
        raise ValueError(f"ids must hold real tokens only (no pad {PAD_ID} or EOS {EOS_ID}): {ids[:20]}...")
    noise = random_spans_noise_mask(ids.size, noise_density, mean_span_length, rng, random_roll=random_roll)
    starts = noise & ~np.concatenate([[False], noise[:-1]])  # first token of each span
    num_spans = int(starts.sum())
    if num_spans and ids.max() >= vocab_size - num_spans:
        raise ConfigError(
            f"vocab_size={vocab_size} leaves no room for {num_spans} sentinel ids "
            f"({vocab_size - num_spans}..{vocab_size - 1}) above the largest token id {ids.max()}; "
            "use a larger vocab_size or a tokenizer with fewer ids."
        )
    sentinels = (vocab_size - 1 - (np.cumsum(starts) - 1)).astype(ids.dtype)  # per position, used at starts
    inputs = np.where(starts, sentinels, ids)[~noise | starts]
    targets = np.insert(ids[noise], np.flatnonzero(starts[noise]), sentinels[starts])
    eos = np.array([EOS_ID])
    return (np.concatenate([inputs, eos]).astype(np.int32), np.concatenate([targets, eos]).astype(np.int32))


def max_spans(input_length: int, noise_density: float, mean_span_length: float, random_roll: bool) -> int:
    """Most noise spans (sentinels) in a sequence whose corrupted input fits `input_length`."""
    check_noise_args(noise_density, mean_span_length)
    # Sequences that fit have at most input_length - 1 tokens (+ EOS); a rolled span may wrap around.
    spans = max(_span_counts(n, noise_density, mean_span_length)[1] for n in range(input_length))
    return spans + (1 if random_roll and spans else 0)


def max_target_length(
    input_length: int, noise_density: float = 0.15, mean_span_length: float = 3.0, random_roll: bool = False
) -> int:
    """Longest target (spans, sentinels, EOS) of a sequence whose corrupted input fits `input_length`."""
    check_noise_args(noise_density, mean_span_length)
    counts = [_span_counts(n, noise_density, mean_span_length) for n in range(input_length)]
    wrap = 1 if random_roll else 0
    return max(noise + spans + (wrap if spans else 0) for noise, spans in counts) + 1


def tokenize_captions(captions: Sequence[str], tokenizer: Tokenizer) -> list[np.ndarray]:
    """Each caption's token ids without EOS or padding (cut to tokenizer.max_length - 1 tokens)."""
    out: list[np.ndarray] = []
    truncated = 0
    for begin in range(0, len(captions), _TOKENIZE_CHUNK):
        with warnings.catch_warnings(record=True) as caught:  # one summary line, not one per caption
            warnings.simplefilter("always")
            tokens = tokenizer(captions[begin : begin + _TOKENIZE_CHUNK])
        truncated += len(caught)
        for ids, mask in zip(tokens["text_ids"], tokens["text_mask"], strict=True):
            real = ids[mask]
            out.append(real[:-1] if real.size and real[-1] == EOS_ID else real)
    if truncated:
        log.warning("%d of %d captions are longer than max_length=%d tokens; truncated.",
                    truncated, len(captions), tokenizer.max_length)
    return out


def token_ranges(
    captions: Sequence[str], spans: Sequence[Sequence[tuple[int, int]]], tokenizer: Tokenizer
) -> list[list[tuple[int, int]]]:
    """Per caption, the token range [lo, hi) of each (start, end) character span (of whole words).

    The span's tokens are those the caption gains from its cut at the span's start to its cut at the end:
    exact for tokenizers whose pieces never cross a word boundary (bytes, SentencePiece, T5's vocabulary).
    A cut caption that does not tokenize as the start of the whole caption is refused with that reason.
    Ranges may reach past a tokenizer's max_length; cut them where the ids are cut.
    """
    if len(spans) != len(captions):
        raise ValueError(f"{len(captions)} captions but {len(spans)} lists of spans.")
    cuts = sorted({(i, cut) for i, caption_spans in enumerate(spans) for span in caption_spans
                   for cut in span[:2] if cut > 0})
    lengths: dict[tuple[int, int], int] = {}
    full = [list(ids) for begin in range(0, len(captions), _TOKENIZE_CHUNK)
            for ids in tokenizer.encode_batch(list(captions[begin : begin + _TOKENIZE_CHUNK]))]
    for begin in range(0, len(cuts), _TOKENIZE_CHUNK):
        chunk = cuts[begin : begin + _TOKENIZE_CHUNK]
        encoded = tokenizer.encode_batch([captions[i][:cut] for i, cut in chunk])
        for (i, cut), ids in zip(chunk, encoded, strict=True):
            if list(ids) != full[i][: len(ids)]:
                raise ValueError(f"{tokenizer!r} tokenizes {captions[i][:cut]!r} as {list(ids)}, not as the "
                                 f"start of {captions[i]!r} ({full[i]}): its pieces cross word boundaries, "
                                 "so words cannot be placed on tokens.")
            lengths[i, cut] = len(ids)
    return [[(lengths.get((i, span[0]), 0), lengths.get((i, span[1]), 0)) for span in caption_spans]
            for i, caption_spans in enumerate(spans)]


# (start, end, tags) character spans of one caption's tagged words; tags: 0/1 per tag column, -1 = n/a.
TagSpans = Sequence[tuple[int, int, Sequence[int]]]


def tag_tokens(
    captions: Sequence[str],
    spans: Sequence[TagSpans],
    tokenizer: Tokenizer,
    num_tags: int,
    caption_ids: Sequence[np.ndarray] | None = None,
) -> list[np.ndarray]:
    """Per caption, int32 [its `tokenize_captions` length, num_tags]: each token's tags from the
    character spans (start, end, num_tags tags in {0, 1}, or -1 where one does not apply) of its words
    (`token_ranges`), -1 for untagged tokens. caption_ids: `tokenize_captions`'s output where the caller
    has it already (tokenized here otherwise)."""
    ranges = token_ranges(captions, spans, tokenizer)
    if caption_ids is None:
        caption_ids = tokenize_captions(captions, tokenizer)
    lengths = [len(ids) for ids in caption_ids]
    out = []
    for i, caption_spans in enumerate(spans):
        tags = np.full((lengths[i], num_tags), -1, np.int32)
        for (a, b, word_tags), (lo, hi) in zip(caption_spans, ranges[i], strict=True):
            if len(word_tags) != num_tags or not set(word_tags) <= {-1, 0, 1}:
                raise ValueError(f"each word has {num_tags} tags of 0, 1 or -1 (does not apply), got "
                                 f"{word_tags} for {captions[i][a:b]!r}.")
            tags[lo:hi] = word_tags
        out.append(tags)
    return out


def batch_from_ids(
    sequences: Sequence[np.ndarray],
    rng: np.random.Generator,
    *,
    input_length: int,
    target_length: int,
    vocab_size: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    random_roll: bool = False,
    tags: Sequence[np.ndarray | None] | None = None,
) -> dict[str, np.ndarray]:
    """Batch of int32 arrays (pad 0): input_ids, input_mask [B, input_length] (span-corrupted);
    decoder_input_ids (targets shifted right, starting with pad = decoder start), target_ids, target_mask
    [B, target_length]. With `tags` (one array or None per row, `tag_tokens`) also caption_ids,
    caption_mask (the whole caption and EOS) [B, input_length] and tags [B, input_length, num_tags] (-1
    where untagged). Sequences longer than input_length - 1 tokens are cut."""
    need = max_target_length(input_length, noise_density, mean_span_length, random_roll)
    if target_length < need:
        raise ConfigError(f"target_length={target_length} is too short for input_length={input_length}: "
                          f"targets need up to {need} tokens.")
    shape = (len(sequences), input_length)
    batch = {"input_ids": np.zeros(shape, np.int32),
             "target_ids": np.zeros((len(sequences), target_length), np.int32)}
    if tags is not None:
        num_tags = next((t.shape[1] for t in tags if t is not None), 1)
        batch.update(caption_ids=np.zeros(shape, np.int32), tags=np.full((*shape, num_tags), -1, np.int32))
    for row, ids in enumerate(sequences):
        ids = np.asarray(ids)[: input_length - 1]
        inputs, targets = span_corruption(
            ids, rng, noise_density=noise_density, mean_span_length=mean_span_length,
            vocab_size=vocab_size, random_roll=random_roll,
        )
        batch["input_ids"][row, : inputs.size] = inputs
        batch["target_ids"][row, : targets.size] = targets
        if tags is not None:
            batch["caption_ids"][row, : ids.size + 1] = np.append(ids, EOS_ID)
            if tags[row] is not None:
                if len(tags[row]) < ids.size:
                    raise ValueError(f"row {row} has {ids.size} tokens but {len(tags[row])} tags.")
                batch["tags"][row, : ids.size] = tags[row][: ids.size]
    batch["input_mask"] = (batch["input_ids"] != PAD_ID).astype(np.int32)
    if tags is not None:
        batch["caption_mask"] = (batch["caption_ids"] != PAD_ID).astype(np.int32)
    batch["target_mask"] = (batch["target_ids"] != PAD_ID).astype(np.int32)
    batch["decoder_input_ids"] = np.pad(batch["target_ids"][:, :-1], ((0, 0), (1, 0)), constant_values=PAD_ID)
    return batch


def make_batch(
    captions: Sequence[str],
    tokenizer: Tokenizer,
    rng: np.random.Generator,
    *,
    input_length: int,
    target_length: int | None = None,
    vocab_size: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    random_roll: bool = False,
) -> dict[str, np.ndarray]:
    """`batch_from_ids` of the captions' tokens; target_length None = the longest possible target."""
    if target_length is None:
        target_length = max_target_length(input_length, noise_density, mean_span_length, random_roll)
    return batch_from_ids(
        tokenize_captions(captions, tokenizer), rng, input_length=input_length, target_length=target_length,
        vocab_size=vocab_size, noise_density=noise_density, mean_span_length=mean_span_length,
        random_roll=random_roll,
    )


# ---------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------


class TagHead(nn.Module):
    """[..., d_model] encoder outputs -> [..., num_tags] float32 tag logits: one linear read-out, so the
    encoder itself must write the tags into each token's output (where the U-Net's cross-attention reads
    them)."""

    num_tags: int

    @nn.compact
    def __call__(self, encoded: jax.Array) -> jax.Array:
        return nn.Dense(self.num_tags, dtype=jnp.float32)(encoded.astype(jnp.float32))


def make_train_step(
    model: T5EncoderDecoder,
    optimizer: optax.GradientTransformation,
    *,
    span_weight: float = 1.0,
    tag_weight: float = 0.0,
):
    """Pure `(state, batch) -> (state, metrics)` with state = (params, opt_state); the caller jits it.
    Loss: span_weight x the span targets' cross-entropy, averaged over real target tokens (accuracy:
    argmax matches, same average; with span_weight 0 the decoder is not run, and params need only
    "encoder"), plus tag_weight x the tags' sigmoid cross-entropy, averaged over tagged tokens and
    columns, of the linear head params["tag_head"] on the encoder's outputs for the whole captions
    (tag_accuracy [num_tags]: per column, the share of tagged tokens whose logit's sign matches)."""
    encoder = T5Encoder(model.config, dtype=model.dtype, param_dtype=model.param_dtype)

    def loss_fn(params: Any, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        loss = jnp.zeros((), jnp.float32)
        metrics = {"span_loss": loss, "accuracy": loss}
        if span_weight > 0:
            t5_params = {k: v for k, v in params.items() if k != "tag_head"}
            logits = model.apply(
                {"params": t5_params}, batch["input_ids"], batch["input_mask"], batch["decoder_input_ids"]
            )
            weights = batch["target_mask"].astype(jnp.float32)
            count = jnp.maximum(weights.sum(), 1.0)
            xent = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_ids"])
            span_loss = (xent * weights).sum() / count
            right = jnp.argmax(logits, -1) == batch["target_ids"]
            metrics = {"span_loss": span_loss, "accuracy": (right * weights).sum() / count}
            loss = span_weight * span_loss
        if tag_weight > 0:
            encoded = encoder.apply(
                {"params": params["encoder"]}, batch["caption_ids"], batch["caption_mask"]
            )
            tag_logits = TagHead(batch["tags"].shape[-1]).apply({"params": params["tag_head"]}, encoded)
            tagged = (batch["tags"] >= 0).astype(jnp.float32)
            labels = (batch["tags"] == 1).astype(jnp.float32)
            xent = optax.sigmoid_binary_cross_entropy(tag_logits, labels)
            tag_loss = (xent * tagged).sum() / jnp.maximum(tagged.sum(), 1.0)
            right = ((tag_logits > 0) == (labels > 0)) * tagged
            metrics["tag_accuracy"] = right.sum((0, 1)) / jnp.maximum(tagged.sum((0, 1)), 1.0)
            loss = loss + tag_weight * tag_loss
        metrics["loss"] = loss
        return loss, metrics

    def train_step(state: tuple[Any, Any], batch: dict[str, jax.Array]):
        params, opt_state = state
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), metrics

    return train_step


def fitted_input_length(corpus: Sequence[np.ndarray]) -> int:
    """The encoder input length that pretraining on `corpus` (token ids without EOS) needs: its longest
    caption and EOS. A span-corrupted caption is no longer (one sentinel replaces at least one token).
    Padding past it changes neither loss, since T5's positions are relative and its attention and both
    losses mask padding (`tests/test_text_pretrain.py`)."""
    return max(ids.size for ids in corpus) + 1


def _epoch_batches(num_items: int, batch_size: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
    """Index batches that visit every item once per epoch in a fresh random order."""
    order, pos = rng.permutation(num_items), 0
    while True:
        take = []
        while len(take) < batch_size:
            if pos == num_items:
                order, pos = rng.permutation(num_items), 0
            n = min(batch_size - len(take), num_items - pos)
            take.extend(order[pos : pos + n])
            pos += n
        yield np.asarray(take)


def pretrain_t5(
    t5_config: T5Config,
    tokenizer: Tokenizer,
    captions: Sequence[str],
    *,
    num_steps: int,
    batch_size: int,
    learning_rate: float,
    seed: int,
    noise_density: float = 0.15,
    mean_span_length: float = 3.0,
    random_roll: bool = True,
    decoder_layers: int | None = None,
    warmup_steps: int | None = None,
    weight_decay: float = 0.01,
    log_every: int = 100,
    time_budget_s: float = 0,
    tag_spans: Sequence[TagSpans] | None = None,
    tag_weight: float = 0.0,
    span_weight: float = 1.0,
    compiler_options: Mapping[str, Any] | None = None,
) -> tuple[Any, list[float]]:
    """Span-corruption pretraining of a T5 encoder-decoder on `captions`; returns (encoder params: the
    T5Encoder tree, unboxed float32, usable with `T5Encoder` / `save_encoder`; loss per step).

    tag_spans (one list per caption, `tag_tokens`, every word with the same number of tags) and
    tag_weight > 0: the encoder also reads each whole caption, and a linear head (`TagHead`, dropped with
    the decoder) on its outputs learns each tagged token's 0/1 tags; the loss adds tag_weight x their
    sigmoid cross-entropy. span_weight scales span corruption's loss; 0 = tags only (no decoder is made).

    Inputs are `fitted_input_length` long: the longest caption and its EOS, often well short of
    tokenizer.max_length (the length the encoder later serves). Padding further would change nothing
    either loss reads, only cost time. compiler_options go to the programs' `jax.jit`.

    AdamW with linear warmup (default num_steps // 10 steps) and cosine decay to 0.1 x learning_rate,
    gradients clipped to global norm 1; weight decay on matrices only. Deterministic for a seed: numpy
    Generator(seed) draws batches and noise, PRNGKey(seed) the initialisation. time_budget_s > 0 stops
    early (after that many seconds). random_roll defaults to True here: captions are short, and unrolled
    their one or two spans always include the caption's end (see `random_spans_noise_mask`).
    """
    if num_steps < 1 or batch_size < 1:
        raise ConfigError(f"num_steps ({num_steps}) and batch_size ({batch_size}) must be positive.")
    check_tokenizer_vocab(tokenizer, t5_config)
    check_loss_weights(span_weight, tag_weight)
    tagging = tag_weight > 0
    if tagging and (tag_spans is None or len(tag_spans) != len(captions)):
        raise ConfigError(f"tag_weight={tag_weight} needs one list of tag spans per caption "
                          f"({len(captions)}), got {None if tag_spans is None else len(tag_spans)}.")
    caption_ids = tokenize_captions(captions, tokenizer)
    num_tags = next((len(t) for spans in (tag_spans or []) for _, _, t in spans), 1)
    caption_tags = (tag_tokens(captions, tag_spans, tokenizer, num_tags, caption_ids) if tagging
                    else [None] * len(captions))
    pairs = [(ids, tags if tags is not None and (tags >= 0).any() else None)
             for ids, tags in zip(caption_ids, caption_tags, strict=True) if ids.size]
    if not pairs:
        raise ValueError(f"no caption among {len(captions)} has any token; nothing to pretrain on.")
    if tagging and all(tags is None for _, tags in pairs):
        raise ConfigError(f"tag_weight={tag_weight} but no caption has a tagged token.")
    corpus = [ids for ids, _ in pairs]
    input_length = fitted_input_length(corpus)
    target_length = max_target_length(input_length, noise_density, mean_span_length, random_roll)
    most_spans = max_spans(input_length, noise_density, mean_span_length, random_roll)
    largest_id = max(int(ids.max()) for ids in corpus)
    if largest_id >= t5_config.vocab_size - most_spans:
        raise ConfigError(
            f"vocab_size={t5_config.vocab_size} leaves no room for {most_spans} sentinel ids above the "
            f"largest caption token id {largest_id}; increase vocab_size (ByT5 bytes need 259 + sentinels)."
        )

    model = T5EncoderDecoder(t5_config, decoder_layers)
    np_rng = np.random.default_rng(seed)
    warmup = max(1, num_steps // 10) if warmup_steps is None else warmup_steps
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, warmup, max(num_steps, warmup + 1), end_value=0.1 * learning_rate
    )
    is_matrix = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norm scales
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=weight_decay, mask=is_matrix)
    )

    def init(rng: jax.Array) -> tuple[Any, Any]:
        ids = jnp.zeros((1, input_length), jnp.int32)
        dec = jnp.zeros((1, target_length), jnp.int32)
        if span_weight > 0:
            params = nn.unbox(model.init(rng, ids, ids > 0, dec)["params"])
        else:  # the encoder's tree as in the encoder-decoder, and no decoder to train
            encoder = T5Encoder(t5_config, dtype=model.dtype, param_dtype=model.param_dtype)
            params = {"encoder": nn.unbox(encoder.init(rng, ids, ids > 0)["params"])}
        if tagging:
            encoded = jnp.zeros((1, input_length, t5_config.d_model), jnp.float32)
            params["tag_head"] = TagHead(num_tags).init(jax.random.fold_in(rng, 1), encoded)["params"]
        return params, optimizer.init(params)

    state = jax.jit(init, compiler_options=compiler_options)(jax.random.PRNGKey(seed))
    step_fn = jax.jit(
        make_train_step(model, optimizer, span_weight=span_weight, tag_weight=tag_weight),
        donate_argnums=(0,),
        compiler_options=compiler_options,
    )
    sizes = {k: sum(p.size for p in jax.tree.leaves(v)) for k, v in state[0].items()}
    log.info("pretraining T5 on %d captions (%d tagged): %d steps x batch %d, input length %d (the longest "
             "caption; served at %d), target length %d, parameters %s", len(corpus),
             sum(tags is not None for _, tags in pairs), num_steps, batch_size, input_length,
             tokenizer.max_length, target_length, sizes)

    batches = _epoch_batches(len(corpus), batch_size, np_rng)
    metrics_history: list[dict[str, jax.Array]] = []
    started = time.perf_counter()
    logged_step = 0  # metrics of steps after this one are not reported yet
    clock_step, clock_time = 0, started  # throughput window; restarts after step 1 (mostly compilation)
    for step in range(1, num_steps + 1):
        rows = next(batches)
        batch = batch_from_ids(
            [corpus[i] for i in rows], np_rng, input_length=input_length,
            target_length=target_length, vocab_size=t5_config.vocab_size, noise_density=noise_density,
            mean_span_length=mean_span_length, random_roll=random_roll,
            tags=[pairs[i][1] for i in rows] if tagging else None,
        )
        state, metrics = step_fn(state, batch)
        metrics_history.append(metrics)
        # Wait for the previous step only: the host builds the next batch while this one runs, and the
        # time budget is not overrun by a queue of dispatched steps.
        jax.block_until_ready(metrics_history[-2] if step > 1 else metrics)
        if step == 1:
            clock_step, clock_time = 1, time.perf_counter()
        out_of_time = time_budget_s > 0 and time.perf_counter() - started > time_budget_s
        if step % log_every == 0 or step == num_steps or out_of_time:
            window = jax.device_get(metrics_history[logged_step:step])
            loss = float(np.mean([m["loss"] for m in window]))
            accuracy = float(np.mean([m["accuracy"] for m in window]))
            tag_right = np.mean([m["tag_accuracy"] for m in window], axis=0) if tagging else []
            tagged = (f", span loss {np.mean([m['span_loss'] for m in window]):.4g}, tags right "
                      + "/".join(f"{a:.3f}" for a in tag_right) if tagging else "")
            if not np.isfinite(loss):
                raise NonFiniteError(f"T5 pretraining loss is {loss} in steps {logged_step + 1}..{step}; "
                                     "lower config.text.pretrain.learning_rate.")
            now = time.perf_counter()
            rate = (step - clock_step) / max(now - clock_time, 1e-9)
            eta = f"{(num_steps - step) / rate:.0f} s" if rate > 0 else "?"
            log.info("pretrain T5 step %d/%d [%.0f%%], loss %.4g, accuracy %.3f%s, %.2f steps/s, ETA %s",
                     step, num_steps, 100.0 * step / num_steps, loss, accuracy, tagged, rate, eta)
            logged_step, clock_step, clock_time = step, step, now
        if out_of_time:
            log.info("pretrain T5: time budget of %.0f s reached; stopped after %d of %d steps.",
                     time_budget_s, step, num_steps)
            break
    losses = [float(m["loss"]) for m in jax.device_get(metrics_history)]
    encoder_params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), state[0]["encoder"])
    return encoder_params, losses


# ---------------------------------------------------------------------------------------------------
# Saving in Hugging Face format
# ---------------------------------------------------------------------------------------------------


def hf_encoder_config(t5_config: T5Config) -> dict[str, Any]:
    """config.json of a Hugging Face T5EncoderModel with these sizes."""
    return {
        "architectures": ["T5EncoderModel"],
        "model_type": "t5",
        "vocab_size": t5_config.vocab_size,
        "d_model": t5_config.d_model,
        "d_kv": t5_config.d_kv,
        "d_ff": t5_config.d_ff,
        "num_heads": t5_config.num_heads,
        "num_layers": t5_config.num_layers,
        "feed_forward_proj": t5_config.feed_forward,
        "relative_attention_num_buckets": t5_config.relative_attention_num_buckets,
        "relative_attention_max_distance": t5_config.relative_attention_max_distance,
        "layer_norm_epsilon": t5_config.layer_norm_epsilon,
        "tie_word_embeddings": False,  # v1.1
        "pad_token_id": PAD_ID,
        "eos_token_id": EOS_ID,
        "decoder_start_token_id": PAD_ID,
        "dropout_rate": 0.0,
        "torch_dtype": "float32",
    }


def _write_synced(path: pathlib.Path, write) -> None:
    write(path)
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_encoder(folder: str | os.PathLike, t5_config: T5Config, encoder_params: Any) -> pathlib.Path:
    """Writes `folder` as a Hugging Face T5 encoder checkpoint (config.json + model.safetensors, float32,
    PyTorch layout). Written under a temporary name and renamed, so a killed process leaves either the
    previous folder or the complete new one, never a partial one under `folder`. Returns the folder."""
    from safetensors.numpy import save_file

    folder = pathlib.Path(folder)
    names = hf_param_names(t5_config)
    flat = traverse_util.flatten_dict(nn.unbox(encoder_params))
    if set(flat) != set(names):
        missing = sorted("/".join(p) for p in set(names) - set(flat))
        extra = sorted("/".join(p) for p in set(flat) - set(names))
        raise ValueError(f"encoder_params do not match a T5 encoder of {t5_config}: missing {missing[:5]}, "
                         f"unexpected {extra[:5]}.")
    tensors = {}
    for path, (hf_name, transpose) in names.items():
        value = np.asarray(jax.device_get(flat[path]), np.float32)
        tensors[hf_name] = np.ascontiguousarray(value.T if transpose else value)

    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    config_text = json.dumps(hf_encoder_config(t5_config), indent=2) + "\n"
    _write_synced(tmp / "config.json", lambda p: p.write_text(config_text))
    # "pt" metadata: the tensors are in PyTorch's layout, so transformers' T5EncoderModel loads it too.
    _write_synced(tmp / "model.safetensors", lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)  # a directory rename cannot replace a non-empty one
    tmp.rename(folder)
    if old.exists():
        shutil.rmtree(old)
    log.info("saved the T5 encoder (%d tensors) to %s", len(tensors), folder)
    return folder
