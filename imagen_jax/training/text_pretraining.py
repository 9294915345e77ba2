"""The run's own text encoder: with `config.text.encoder = "pretrain"`, a small T5 (sized by
`config.text.t5`) is pretrained with T5's span-corruption objective on the run's training captions before
the U-Net trains, saved as a Hugging Face folder under `<workdir>/text_encoder`, then frozen (and cached)
like any pretrained T5. A rerun or `sample.py` on the workdir loads it from there; it is pretrained once.

Imagen's recipe at small scale: the language lives in a frozen, pretrained encoder. It pays where the
captions' words predict each other; on the shapes captions, whose attributes are independent, it did not
(docs/shapes_demo.md, wording).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import ml_collections
from jax.experimental import multihost_utils

from imagen_jax.data.pipeline import as_str
from imagen_jax.parallel import distributed
from imagen_jax.text import pretrain
from imagen_jax.text.build import PRETRAINED_IN_RUN, pretrained_folder
from imagen_jax.text.encoder import t5_config_from_dict
from imagen_jax.text.tokenizers import make_tokenizer
from imagen_jax.training.progress import MetricWriter

log = logging.getLogger(__name__)

LOSSES_FILE = "pretrain_losses.json"
_CURVE_EVERY = 10  # steps per TensorBoard point of the pretraining loss


def ensure_text_encoder(text: ml_collections.ConfigDict, workdir: str, source: Sequence[dict]) -> None:
    """Pretrains and saves the run's T5 on the captions of the training `source` unless the workdir has it
    (`text.encoder` other than "pretrain": nothing to do). Process 0 pretrains; the others wait for it."""
    if text.encoder != PRETRAINED_IN_RUN:
        return
    folder = pretrained_folder(workdir)
    if (folder / "config.json").exists():
        log.info("text encoder: the T5 pretrained in this run, %s", folder)
        return
    if distributed.is_primary():
        pt = text.pretrain
        captions = [as_str(source[i]["caption"]) for i in range(len(source))]
        t5_config = t5_config_from_dict(text.t5)
        log.info(
            "pretraining the text encoder (T5 %d layers, d_model %d) on %d captions: %d steps of %d, span "
            "corruption %.0f%% of tokens in spans of %.1f",
            t5_config.num_layers,
            t5_config.d_model,
            len(captions),
            pt.num_steps,
            pt.batch_size,
            100 * pt.noise_density,
            pt.mean_span_length,
        )
        params, losses = pretrain.pretrain_t5(
            t5_config,
            make_tokenizer(text.tokenizer, int(text.max_length)),
            captions,
            num_steps=pt.num_steps,
            batch_size=pt.batch_size,
            learning_rate=pt.learning_rate,
            seed=int(text.seed),
            noise_density=pt.noise_density,
            mean_span_length=pt.mean_span_length,
            decoder_layers=pt.decoder_layers or None,
            log_every=pt.log_every,
            time_budget_s=60.0 * pt.time_budget_minutes,
        )
        pretrain.save_encoder(folder, t5_config, params)
        (folder / LOSSES_FILE).write_text(json.dumps({"loss": [float(x) for x in losses]}))
        writer = MetricWriter(folder.parent / "tensorboard")
        for end in range(_CURVE_EVERY, len(losses) + _CURVE_EVERY, _CURVE_EVERY):
            window = losses[end - _CURVE_EVERY : end]
            writer.scalars(min(end, len(losses)), {"text_pretrain/loss": sum(window) / len(window)})
        writer.close()
        log.info("text encoder pretrained: loss %.3f -> %.3f, saved to %s", losses[0], losses[-1], folder)
    multihost_utils.sync_global_devices("pretrained text encoder saved")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"{folder}: process 0 pretrained the text encoder but this process cannot see it; with "
            "text.encoder='pretrain', multi-host runs need a workdir on a filesystem every host shares."
        )
