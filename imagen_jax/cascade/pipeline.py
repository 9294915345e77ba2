"""The cascade: text -> base stage -> super-resolution stages, as one pipeline (Python API).

    cascade = Cascade.load(["runs/shapes", "runs/shapes_sr"])
    images = cascade.sample(["a large red circle"], rng=jax.random.PRNGKey(0))  # one array per stage

Any prefix of a cascade works (a base stage alone, base + one SR stage, ...). Loading refuses, naming the
stage and the fix: a stage without a trained checkpoint (never sample noise silently), a first stage that
is a super-resolution stage or a later one that is not, a stage whose input resolution is not the previous
stage's output, and (when the text is shared) stages with different text encoders. The prompts are
encoded once when the stages share their encoder, as the paper's three stages share T5-XXL.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from imagen_jax.errors import CheckpointNotFoundError, ConfigError
from imagen_jax.stage import integrity
from imagen_jax.stage.build import Stage, load_stage
from imagen_jax.stage.sampling import encode_prompts, generate
from imagen_jax.text.build import LEARNED_TOKENIZER, PRETRAINED_IN_RUN

# Per-stage sampling settings a caller may set; None (or absent) = that stage's config.sample value.
STAGE_OPTIONS = (
    "guidance",
    "sampler",
    "num_steps",
    "eta",
    "threshold",
    "percentile",
    "time_grid",
    "aug_level",
)


def _text_identity(stage: Stage) -> dict[str, Any]:
    """What decides the text embeddings: the encoder's config (a jointly trained one is never shared), and
    what each run made for itself: a T5 pretrained in the run (its weights) and a vocabulary learned from
    its captions (the model file); two runs may have made different ones."""
    identity = json.loads(stage.config.text.to_json_best_effort())
    if stage.config.text.encoder == PRETRAINED_IN_RUN:
        identity["weights"] = integrity.digest_tree(stage.text.params)[0]
    if stage.config.text.get("tokenizer") == LEARNED_TOKENIZER:
        identity["vocabulary"] = hashlib.sha256(stage.text.tokenizer.path.read_bytes()).hexdigest()
    return identity


def _text_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    if a.get("weights") != b.get("weights"):
        return ["each stage pretrained its own T5 (text.encoder='pretrain'), with different weights"]
    if a.get("vocabulary") != b.get("vocabulary"):
        return ["each stage learned its own vocabulary from its captions (text.tokenizer='captions'), "
                "and they differ"]
    keys = ("encoder", "tokenizer", "max_length", "dtype", "seed", "t5", "train_jointly")
    return [f"text.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys if a.get(k) != b.get(k)]


@dataclasses.dataclass(frozen=True)
class Cascade:
    """Loaded stages, base first; `names` label them in messages (their workdirs, by default)."""

    stages: tuple[Stage, ...]
    names: tuple[str, ...]
    share_text: bool = True

    @classmethod
    def load(
        cls,
        workdirs: Sequence[str],
        *,
        steps: Sequence[int | None] | None = None,
        share_text: bool = True,
    ) -> Cascade:
        """Loads each stage's EMA weights from the newest good checkpoint (or `steps[i]`) and checks that
        the stages fit together."""
        if not workdirs:
            raise ConfigError("a cascade needs at least one stage (the base stage's workdir).")
        steps = list(steps) if steps is not None else [None] * len(workdirs)
        stages = []
        for index, (workdir, step) in enumerate(zip(workdirs, steps, strict=True)):
            try:
                stages.append(load_stage(workdir, step=step))
            except CheckpointNotFoundError as err:
                raise CheckpointNotFoundError(
                    f"cascade stage {index + 1} has no trained weights (an untrained stage would only draw "
                    f"noise): {err}"
                ) from None
        cascade = cls(tuple(stages), tuple(workdirs), share_text)
        cascade.check()
        return cascade

    def check(self) -> None:
        """Raises ConfigError naming the stage when the stages do not form a cascade."""
        for index, (stage, name) in enumerate(zip(self.stages, self.names, strict=True)):
            label = f"cascade stage {index + 1} ({name})"
            if index == 0:
                if stage.lowres_resolution:
                    raise ConfigError(
                        f"{label} is {stage.kind}; the first stage must be a base stage that samples from "
                        "text alone. Put the base stage's workdir first."
                    )
                continue
            previous = self.stages[index - 1]
            if not stage.lowres_resolution:
                raise ConfigError(
                    f"{label} is {stage.kind}, which takes no low-res input; only the first stage may be "
                    "one. Pass super-resolution stages after the base stage."
                )
            if stage.lowres_resolution != previous.resolution:
                raise ConfigError(
                    f"{label} upsamples {stage.lowres_resolution}x{stage.lowres_resolution} images, but "
                    f"stage {index} ({self.names[index - 1]}) makes {previous.resolution}x"
                    f"{previous.resolution} ones: use an SR stage trained with "
                    f"config.data.lowres_resolution={previous.resolution}."
                )
            if self.share_text:
                diffs = _text_differences(_text_identity(self.stages[0]), _text_identity(stage))
                jointly = stage.config.text.train_jointly or self.stages[0].config.text.train_jointly
                if diffs or jointly:
                    why = "; ".join(diffs) if diffs else "a jointly trained encoder has per-stage weights"
                    raise ConfigError(
                        f"{label} has another text encoder than stage 1 ({why}), so the prompts cannot be "
                        "encoded once for both: train the stages with the same config.text, or encode per "
                        "stage (share_text=False, sample.py --noshare_text)."
                    )

    def sample(
        self,
        prompts: Sequence[str],
        *,
        rng: jax.Array,
        options: Sequence[Mapping[str, Any]] | None = None,
        batch_size: int | None = None,
    ) -> list[np.ndarray]:
        """Images of every stage (uint8 [N, R_k, R_k, 3], one array per stage) for one image per prompt.

        `options[k]` overrides stage k's sampling settings (keys: STAGE_OPTIONS); unset keys use the stage's
        config. Each stage's input is the previous stage's 8-bit output, as a user's saved images would be.
        """
        options = list(options) if options is not None else [{}] * len(self.stages)
        if len(options) != len(self.stages):
            raise ConfigError(f"{len(options)} sets of sampling options for {len(self.stages)} stages.")
        for opts in options:
            unknown = sorted(set(opts) - set(STAGE_OPTIONS))
            if unknown:
                raise ConfigError(f"unknown sampling options {unknown}; allowed: {list(STAGE_OPTIONS)}.")
        text = encode_prompts(self.stages[0], prompts) if self.share_text else None
        outputs: list[np.ndarray] = []
        for index, (stage, opts) in enumerate(zip(self.stages, options, strict=True)):
            chosen = {k: v for k, v in opts.items() if v is not None}
            if not stage.lowres_resolution:
                chosen.pop("aug_level", None)
            images = generate(
                stage,
                prompts,
                rng=jax.random.fold_in(rng, index),
                lowres=outputs[-1] if outputs else None,
                text=text,
                batch_size=batch_size,
                **chosen,
            )
            outputs.append(images)
        return outputs
