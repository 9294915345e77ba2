"""What a run makes for its text side from its own training captions, before the U-Net trains, once:

- with `config.text.tokenizer = "captions"`, a SentencePiece vocabulary (`config.text.learned_tokenizer`),
  saved as `<workdir>/tokenizer/spiece.model`: word pieces with no file to download;
- with `config.text.encoder = "pretrain"`, a small T5 (sized by `config.text.t5`) pretrained with T5's
  span-corruption objective, and on shapes scenes with `config.text.pretrain.tag_weight` > 0 also a
  per-word loss on which object each word belongs to in the image (`data.shapes.object_tags`), saved as a
  Hugging Face folder under `<workdir>/text_encoder`, then frozen (and cached) like any pretrained T5.

A rerun or `sample.py` on the workdir loads them from there. Process 0 makes them; the others wait.

Imagen's recipe at small scale: the language lives in a frozen, pretrained encoder. Span corruption alone
did not pay on the shapes captions, whose attributes are independent of each other; the per-word tags
teach what a big T5 would bring from its corpus, which object the caption puts where (docs/shapes_demo.md).
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from imagen_jax.data import shapes
from imagen_jax.data.pipeline import read_text_columns
from imagen_jax.errors import ConfigError, InputFileNotFoundError
from imagen_jax.parallel import distributed
from imagen_jax.text import pretrain
from imagen_jax.text.build import (
    LEARNED_TOKENIZER,
    PRETRAINED_IN_RUN,
    build_tokenizer,
    learned_tokenizer_file,
    pretrained_folder,
)
from imagen_jax.text.encoder import t5_config_from_dict
from imagen_jax.text.tokenizers import SentencePieceTokenizer, train_sentencepiece
from imagen_jax.training.progress import MetricWriter

log = logging.getLogger(__name__)

LOSSES_FILE = "pretrain_losses.json"
_CURVE_EVERY = 10  # steps per TensorBoard point of the pretraining loss


def prepare_run_text(
    text: ml_collections.ConfigDict,
    workdir: str,
    source: Sequence[dict],
    compiler_options: Mapping[str, Any] | None = None,
) -> None:
    """Learns the run's vocabulary, then pretrains its T5, on the captions of the training `source`, each
    only where `text` asks for it and the workdir does not have it yet. The pretraining's programs compile
    with `compiler_options` (the run's, `parallel.xla_options.compiler_options`)."""
    tagging = text.encoder == PRETRAINED_IN_RUN and text.pretrain.tag_weight > 0
    # One pass over the source reads what either step needs (the scenes too for the tags).
    keys = ("caption", "scene") if tagging else ("caption",)
    has = sorted(source[0]) if tagging and len(source) else []
    if tagging and "scene" not in has:
        raise ConfigError(
            "config.text.pretrain.tag_weight > 0 tags the words of each training scene, but this dataset's "
            f"records have no 'scene' (only {has}): it needs data.name='shapes', or set "
            "--config.text.pretrain.tag_weight=0."
        )
    columns = functools.cache(lambda: read_text_columns(source, keys))
    captions = lambda: columns()["caption"]  # noqa: E731
    if text.tokenizer == LEARNED_TOKENIZER:
        _ensure_tokenizer(text.learned_tokenizer, workdir, captions)
    if text.encoder == PRETRAINED_IN_RUN:
        def tag_spans() -> list[pretrain.TagSpans]:
            return [shapes.object_tags(caption, shapes.Scene.from_json(scene))
                    for caption, scene in zip(captions(), columns()["scene"], strict=True)]

        _ensure_text_encoder(text, workdir, captions, tag_spans if tagging else None, compiler_options)


def _missing(path: epath.Path) -> bool:
    """Whether process 0 lacks `path`, agreed by every process (each looking for itself could disagree
    while process 0 writes it, and leave process 0 waiting for the others forever)."""
    missing = not path.exists()
    if jax.process_count() > 1:
        missing = bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))
    return missing


def _made_by_process_0(path: epath.Path, what: str) -> None:
    multihost_utils.sync_global_devices(what)
    if not path.exists():
        raise InputFileNotFoundError(
            f"{path}: process 0 made the run's {what} but this process cannot see it; multi-host runs need "
            "a workdir on a filesystem every host shares."
        )


def _ensure_tokenizer(
    learned: ml_collections.ConfigDict, workdir: str, captions: Callable[[], list[str]]
) -> None:
    path = learned_tokenizer_file(workdir)
    if not _missing(path):
        log.info("tokenizer: the vocabulary learned in this run, %s", path)
        return
    if distributed.is_primary():
        start = time.perf_counter()
        try:
            train_sentencepiece(
                captions(),
                path,
                vocab_size=int(learned.vocab_size),
                model_type=learned.model_type,
                normalization=learned.normalization,
            )
        except ConfigError as e:
            raise ConfigError(f"config.text.learned_tokenizer: {e}") from None
        log.info(
            "tokenizer: learned %d %s pieces (256 of them bytes) from %d captions in %.1f s, saved to %s",
            SentencePieceTokenizer(path).vocab_size, learned.model_type, len(captions()),
            time.perf_counter() - start, path,
        )
    _made_by_process_0(path, "vocabulary")


def _ensure_text_encoder(
    text: ml_collections.ConfigDict,
    workdir: str,
    captions: Callable[[], list[str]],
    tag_spans: Callable[[], list[pretrain.TagSpans]] | None,
    compiler_options: Mapping[str, Any] | None,
) -> None:
    folder = pretrained_folder(workdir)
    if not _missing(folder / "config.json"):
        log.info("text encoder: the T5 pretrained in this run, %s", folder)
        return
    if distributed.is_primary():
        pt = text.pretrain
        t5_config = t5_config_from_dict(text.t5)
        log.info(
            "pretraining the text encoder (T5 %d layers, d_model %d) on %d captions: %d steps of %d, span "
            "corruption %.0f%% of tokens in spans of %.1f (loss weight %g), tag loss weight %g",
            t5_config.num_layers,
            t5_config.d_model,
            len(captions()),
            pt.num_steps,
            pt.batch_size,
            100 * pt.noise_density,
            pt.mean_span_length,
            pt.span_weight,
            pt.tag_weight,
        )
        params, losses = pretrain.pretrain_t5(
            t5_config,
            build_tokenizer(text, workdir),
            captions(),
            num_steps=pt.num_steps,
            batch_size=pt.batch_size,
            learning_rate=pt.learning_rate,
            seed=int(text.seed),
            noise_density=pt.noise_density,
            mean_span_length=pt.mean_span_length,
            decoder_layers=pt.decoder_layers or None,
            log_every=pt.log_every,
            time_budget_s=60.0 * pt.time_budget_minutes,
            tag_spans=tag_spans() if tag_spans else None,
            tag_weight=pt.tag_weight,
            span_weight=pt.span_weight,
            compiler_options=compiler_options,
        )
        pretrain.save_encoder(folder, t5_config, params)
        (folder / LOSSES_FILE).write_text(json.dumps({"loss": [float(x) for x in losses]}))
        writer = MetricWriter(folder.parent / "tensorboard")
        for end in range(_CURVE_EVERY, len(losses) + _CURVE_EVERY, _CURVE_EVERY):
            window = losses[end - _CURVE_EVERY : end]
            writer.scalars(min(end, len(losses)), {"text_pretrain/loss": sum(window) / len(window)})
        writer.close()
        log.info("text encoder pretrained: loss %.3f -> %.3f, saved to %s", losses[0], losses[-1], folder)
    _made_by_process_0(folder / "config.json", "pretrained text encoder")
