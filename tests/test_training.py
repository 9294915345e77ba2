"""Training: sharded state, learning, the text encoder pretrained in the run, non-finite stop, clear config
errors (exact kill-and-resume: test_preemption.py)."""

import json
import logging
import re

import jax
import numpy as np
import optax
import pytest
from jax.extend.core import jaxprs_in_params

from configs.shapes import get_config
from imagen_jax.data.shapes import make_example
from imagen_jax.parallel import memory
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import checkpoint
from imagen_jax.text import hf_loader
from imagen_jax.text.tokenizers import SentencePieceTokenizer
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config
from imagen_jax.training.state import make_optimizer


def tiny_config(**train):
    config = get_config("tiny")
    config.train.update(train)
    return config


def _batch(stage, size=16, res=32, seed=0):
    examples = [make_example(seed, "train", i, res) for i in range(size)]
    images = np.stack([e["image"] for e in examples]).astype(np.float32) / 127.5 - 1.0
    tokens = stage.text.tokenizer([e["caption"] for e in examples])
    return {"image": images, **tokens}


def _run_steps(config, mesh, num_steps):
    stage = stage_lib.build_stage(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    state, shardings = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(config.seed))
    host_batch = _batch(stage)
    batch = {
        k: jax.device_put(v, mesh_lib.batch_sharding(mesh, config.sharding, v.ndim))
        for k, v in host_batch.items()
    }
    step = jax.jit(
        loop.train_step_fn(config, stage, optimizer),
        out_shardings=(shardings, None),
        donate_argnums=(0,),
    )
    losses = []
    for _ in range(num_steps):
        state, metrics = step(state, batch, {})
        losses.append(float(metrics["loss"]))
    return state, losses


def test_adafactor_state_is_sharded_and_trains_on_the_mesh():
    """Adafactor (the paper's base-stage optimizer) keeps factored moments of lower rank than their
    parameters; their shardings, the abstract state used for restoring, and the steps must all work."""
    config = tiny_config()
    config.optim.name = "adafactor"
    mesh = mesh_lib.make_mesh([("data", -1)])
    state, losses = _run_steps(config, mesh, 2)
    assert np.all(np.isfinite(losses))
    stage = stage_lib.build_stage(config, mesh)
    structs, _ = state_lib.abstract_train_state(stage, make_optimizer(config.optim, config.train.num_steps))
    shapes = jax.tree.map(lambda x: (x.shape, x.dtype), state)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), structs) == shapes
    ranks = {x.ndim for x in jax.tree.leaves(state.opt_state)}
    assert 1 in ranks and 4 in ranks  # factored statistics next to full conv-kernel-shaped ones


def test_loss_drops_when_training_a_tiny_model():
    config = tiny_config(num_steps=40)
    config.optim.learning_rate = 3e-3
    config.optim.warmup_steps = 5
    _, losses = _run_steps(config, mesh_lib.make_mesh([("data", -1)]), 40)
    # Zero-initialised output layers start at the weighted target variance (~0.31); 40 steps fit well below.
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:3]), losses


def _params_of_last_checkpoint(workdir, config):
    stage = stage_lib.build_stage(config)
    structs, _ = state_lib.abstract_train_state(stage, make_optimizer(config.optim, config.train.num_steps))
    restored, damaged = checkpoint.restore_newest_good(workdir, lambda _: state_lib.to_items(structs), config)
    assert not damaged
    return state_lib.from_items(restored.items)


class Preempted(Exception):
    pass


def test_non_finite_loss_stops_without_writing_a_poisoned_checkpoint(tmp_path, monkeypatch):
    config = tiny_config(num_steps=6, checkpoint_every=2, log_every=2)
    config.data.data_dir = str(tmp_path / "data")
    real_global_batch = loop.global_batch
    calls = {"n": 0}

    def poisoned(local, mesh, rules):
        calls["n"] += 1
        if calls["n"] >= 3:  # the batch of step 3 onward carries a NaN pixel
            local = dict(
                local,
                image=np.where(
                    np.arange(local["image"].size).reshape(local["image"].shape) == 0, np.nan, local["image"]
                ).astype(np.float32),
            )
        return real_global_batch(local, mesh, rules)

    monkeypatch.setattr(loop, "global_batch", poisoned)
    with pytest.raises(loop.NonFiniteLossError, match="non-finite loss between steps 2 and 4"):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    steps = checkpoint.make_manager(str(tmp_path / "run")).all_steps()
    assert list(steps) == [2]


def test_train_step_too_big_for_device_memory_is_refused_after_compiling(monkeypatch):
    """Where devices report an allocator limit (GPU/TPU), a step whose memory plan exceeds it is refused
    with the sizes and the fixes, not left to fail inside XLA at its first call. CPUs report no limit."""
    config = tiny_config()
    mesh = mesh_lib.make_mesh([("data", -1)])
    stage = stage_lib.build_stage(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    state, shardings = state_lib.abstract_train_state(stage, optimizer)
    batch = loop.global_batch(_batch(stage), mesh, config.sharding)
    frozen = loop.frozen_inputs(config, stage, state.params)
    args = (config, stage, optimizer, shardings, state, batch, frozen)
    assert memory.device_memory_limit() is None
    compiled, _ = loop.compile_train_step(*args)
    gradients, update = (memory.memory_plan(program) for program in compiled.programs)
    assert gradients.temporaries > update.temporaries > 0  # the activations are the gradients' program's
    assert update.aliased > 0 and gradients.aliased == 0  # the state is donated to the update only
    plan = compiled.memory_plan()
    assert plan == gradients and plan.total == plan.arguments + plan.outputs + plan.temporaries - plan.aliased

    monkeypatch.setattr(memory, "device_memory_limit", lambda: plan.total)
    for program in compiled.programs:
        memory.check_fits(program, what="the step", fixes="")  # exactly fits
    monkeypatch.setattr(memory, "device_memory_limit", lambda: plan.total - 1)
    with pytest.raises(
        memory.DeviceMemoryError,
        match=r"the train step's gradients program at batch 16 needs \d+\.\d GiB per device by XLA's plan .* "
        r"Lower config.train.batch_size, set config.model.remat=True",
    ):
        loop.compile_train_step(*args)


def test_separate_update_program_takes_the_same_steps_as_the_whole_step():
    """`train.separate_update` compiles the gradients and the update as two programs (at the same time):
    two steps through them end where two steps of the one-program step end, and the state is donated."""
    config = tiny_config()
    mesh = mesh_lib.make_mesh([("data", -1)])
    stage = stage_lib.build_stage(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    batch = loop.global_batch(_batch(stage), mesh, config.sharding)
    ends = {}
    for separate in (False, True):
        config.train.separate_update = separate
        state, shardings = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(0))
        compiled, _ = loop.compile_train_step(config, stage, optimizer, shardings, state, batch, {})
        assert len(compiled.programs) == (2 if separate else 1)
        first = state
        state, first_metrics = compiled(state, batch, {})
        assert all(leaf.is_deleted() for leaf in jax.tree.leaves(first.params))
        state, metrics = compiled(state, batch, {})
        ends[separate] = jax.device_get((state, first_metrics, metrics))
    assert int(ends[True][0].step) == 2
    for whole, separate in zip(jax.tree.leaves(ends[False]), jax.tree.leaves(ends[True]), strict=True):
        np.testing.assert_allclose(separate, whole, rtol=1e-5, atol=1e-6)


def _nested_jits(jaxpr) -> int:
    count = 0
    for eqn in jaxpr.eqns:
        count += eqn.primitive.name in ("jit", "pjit")
        for sub in jaxprs_in_params(eqn.params):
            count += _nested_jits(sub)
    return count


def test_update_is_traced_with_jax_numpy_inlined_and_computes_the_optimizers_update():
    """The update phase traces jax.numpy's functions inline (no nested jit per call, which made tracing a
    large model's optimizer slow), and its new weights are exactly optax's update applied."""
    config = tiny_config()
    config.optim.name = "adafactor"
    config.text.train_jointly = False  # the U-Net's weights are enough
    mesh = mesh_lib.make_mesh([("data", -1)])
    stage = stage_lib.build_stage(config, mesh)
    optimizer = make_optimizer(config.optim, config.train.num_steps)
    state, _ = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.PRNGKey(1), p.shape, p.dtype), state.params)
    loss = jax.numpy.float32(0.5)
    step = loop.train_step_fn(config, stage, optimizer)
    assert _nested_jits(jax.make_jaxpr(step.update)(state, loss, grads).jaxpr) == 0
    assert _nested_jits(jax.make_jaxpr(optimizer.update)(grads, state.opt_state, state.params).jaxpr) > 0
    new_state, metrics = jax.jit(step.update)(state, loss, grads)
    updates, _ = jax.jit(optimizer.update)(grads, state.opt_state, state.params)
    expected = jax.jit(optax.apply_updates)(state.params, updates)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert int(new_state.step) == 1 and float(metrics["loss"]) == 0.5


def test_batch_that_does_not_divide_the_mesh_is_a_clear_error(tmp_path):
    config = tiny_config(batch_size=12)
    with pytest.raises(ValueError, match="batch size 12 does not divide over the 8 devices"):
        loop.train_and_evaluate(config, str(tmp_path))


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("diffusion.objective", "score", "diffusion.objective='score' is not one of"),
        ("sample.sampler", "euler", "sample.sampler='euler' is not one of"),
        ("optim.name", "sgd", "optim.name='sgd' is not one of"),
        ("data.resolution", 30, "not divisible by model.patch_size"),
        ("eval.two_object_prob", 1.5, "eval.two_object_prob=1.5 must be a probability"),
        ("data.made_up_words.prob", -0.1, "data.made_up_words.prob=-0.1 must be a probability"),
        ("data.made_up_words.max_words", 0, "data.made_up_words.max_words"),
        ("xla_options.cpu", "fast_math", "xla_options.cpu: 'fast_math' is not an XLA option"),
        ("compilation_cache_min_compile_seconds", -1.0, "min_compile_seconds=-1.0 must be >= 0"),
        ("model.dtype", "bf16", "model.dtype='bf16' is not one of"),
        ("model.attention_impl", "flash", "model.attention_impl='flash' is not one of"),
        ("model.attention_impl", "cudnn", "attention_impl='cudnn' needs an NVIDIA GPU"),  # CPU tests
        ("text.encoder", "pretrain", "pretrains the T5 and then freezes it: set config.text.train_jointly"),
        ("diffusion.train_logsnr_shift", -40.0, "train_logsnr_shift=-40.0 would put every training level"),
        # The U-Net's fields, from its constructor: before, a shape error or a division by zero inside the
        # first trace, after the data and the text encoder were prepared.
        ("model.channels", -1, "model.channels=-1 must be an int >= 1"),
        ("model.head_dim", 0, "model.head_dim=0 must be >= 1 and divide the width of every level with"),
        ("model.num_heads", 3, "model.num_heads=3 must divide the width of every level with attention"),
        ("model.patch_size", 0, "model.patch_size=0 must be an int >= 1"),
        ("model.dropout", 1.5, r"model.dropout=1.5 must be in \[0, 1\)"),
        ("model.remat_policy", "dots", "model.remat_policy='dots' is not one of"),
        ("model.chanels", 8, "unknown config.model keys"),
        # Before, accepted; eta > 1 speckles DDIM samples, the rest failed or misbehaved only where used.
        ("sample.eta", 1.5, r"config.sample.eta=1.5 must be in \[0, 1\]"),
        ("sample.percentile", 0.0, r"config.sample.percentile=0.0 must be in \(0, 100\]"),
        ("optim.b2", 1.0, r"config.optim.b2=1.0 must be in \[0, 1\)"),
        ("optim.weight_decay", -0.1, "config.optim.weight_decay=-0.1 must be >= 0"),
        ("optim.warmup_steps", -1, "config.optim.warmup_steps=-1 must be >= 0"),
        ("text.max_length", 1, "config.text.max_length=1 must be >= 2"),
        ("eval.num_captions", 0, "config.eval.num_captions=0 must be > 0"),
        ("data.name", "imagenet", "config.data.name='imagenet': use one of"),
    ],
)
def test_bad_config_values_are_named(key, value, message):
    config = tiny_config()
    *sections, field = key.split(".")
    node = config
    for section in sections:
        node = node[section]
    with config.unlocked():
        node[field] = value
    with pytest.raises(ValueError, match=message):
        validate_config(config)


def test_min_snr_gamma_is_checked_where_it_weighs_the_loss():
    config = tiny_config()
    config.diffusion.min_snr_gamma = 0.0
    validate_config(config)  # unused with loss_weighting="none"
    config.diffusion.loss_weighting = "min_snr"
    with pytest.raises(ValueError, match="config.diffusion.min_snr_gamma=0.0 must be > 0"):
        validate_config(config)


def test_image_positions_and_crops_are_refused_together():
    from configs.shapes_sr import get_config as sr_config

    config = sr_config("tiny")
    validate_config(config)
    config.model.image_positions = True
    with pytest.raises(ValueError, match=r"image_positions=True .* crop \(config.data.crop_resolution=32\)"):
        validate_config(config)


def test_a_learned_vocabulary_must_fit_the_t5_it_feeds():
    config = tiny_config()
    config.text.tokenizer = "captions"
    validate_config(config)
    config.text.learned_tokenizer.vocab_size = 512
    with pytest.raises(ValueError, match=r"vocab_size=512 must exceed 259 .* config.text.t5.vocab_size=384"):
        validate_config(config)
    config.text.encoder = "google/t5-v1_1-small"
    with pytest.raises(ValueError, match="the checkpoint 'google/t5-v1_1-small' reads its own"):
        validate_config(config)


def test_object_tags_need_the_shapes_scenes(tmp_path):
    from imagen_jax.training.text_pretraining import prepare_run_text

    config = tiny_config()
    config.text.update(encoder="pretrain", train_jointly=False)
    config.text.pretrain.tag_weight = -1.0
    with pytest.raises(ValueError, match=r"tag_weight=-1.0 must be >= 0"):
        validate_config(config)
    config.text.pretrain.tag_weight = 10.0
    validate_config(config)
    config.data.name = "folder"
    with pytest.raises(ValueError, match=r"only the shapes dataset records \(data.name='folder'\): set "
                       r"--config.text.pretrain.tag_weight=0"):
        validate_config(config)
    # A source without scenes (a folder of images and captions) gets the same fix, not a KeyError.
    with pytest.raises(ValueError, match=r"records have no 'scene' \(only \['caption', 'image'\]\)"):
        prepare_run_text(config.text, str(tmp_path), [{"caption": "a cat", "image": None}])


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    config = tiny_config(num_steps=2, checkpoint_every=2)
    config.data.data_dir = str(tmp_path / "data")
    loop.train_and_evaluate(config, str(tmp_path / "run"))
    other = tiny_config()
    other.model.channels = 24
    expected = r"different architecture:\n  model.channels: checkpoint 16 vs config 24"
    with pytest.raises(ValueError, match=expected):
        stage_lib.load_stage(str(tmp_path / "run"), config=other)
    # Training into it is refused before the run builds data or text files there.
    other.data.data_dir = str(tmp_path / "other_data")
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(checkpoint.CheckpointError, match=expected):
        loop.train_and_evaluate(other, str(tmp_path / "run"))
    assert not (tmp_path / "other_data").exists()
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before


def test_train_then_sample_end_to_end_with_the_vocabulary_and_text_encoder_made_in_the_run(tmp_path, caplog):
    from imagen_jax.cascade.sampling_cli import sample_to_grid

    config = tiny_config(num_steps=2, checkpoint_every=2)
    config.data.data_dir = str(tmp_path / "data")
    config.text.tokenizer = "captions"
    config.text.encoder = "pretrain"
    config.text.train_jointly = False
    config.text.pretrain.update(num_steps=6, batch_size=8, log_every=3, tag_weight=10.0)
    with caplog.at_level(logging.INFO):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert re.search(r"tokenizer: learned \d+ bpe pieces .* from 64 captions", caplog.text)
    assert "tag loss weight 10" in caplog.text
    assert re.search(r"tags right [0-9.]+/[0-9.]+/[0-9.]+", caplog.text)
    vocabulary = (tmp_path / "run" / "tokenizer" / "spiece.model").read_bytes()
    folder = tmp_path / "run" / "text_encoder"
    losses = json.loads((folder / "pretrain_losses.json").read_text())["loss"]
    assert len(losses) == 6 and all(np.isfinite(losses))
    stage = stage_lib.load_stage(str(tmp_path / "run"))
    assert isinstance(stage.text.tokenizer, SentencePieceTokenizer)
    # The pretraining read the captions in the learned pieces: a whole word is one id beyond the bytes.
    circle = stage.text.tokenizer(["circle"])["text_ids"][0, :2].tolist()
    assert circle[0] >= 259 and circle[1] == 1
    saved = hf_loader.load_t5_encoder(str(folder), tokenizer="byte", max_length=config.text.max_length)
    for a, b in zip(jax.tree.leaves(stage.text.params), jax.tree.leaves(saved.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Training on from the checkpoint uses the run's vocabulary and encoder as they are: never made twice.
    config.train.num_steps = 3
    caplog.clear()
    with caplog.at_level(logging.INFO):
        loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert "the vocabulary learned in this run" in caplog.text and "tokenizer: learned" not in caplog.text
    assert "the T5 pretrained in this run" in caplog.text
    assert "pretraining the text encoder" not in caplog.text
    assert (tmp_path / "run" / "tokenizer" / "spiece.model").read_bytes() == vocabulary
    assert json.loads((folder / "pretrain_losses.json").read_text())["loss"] == losses
    png, txt = sample_to_grid(
        str(tmp_path / "run"),
        prompts=["a red circle", ""],
        prompts_file=None,
        num=2,
        out=str(tmp_path / "grid.png"),
        num_steps=2,
        guidance=3.0,
    )
    from PIL import Image

    grid = np.asarray(Image.open(png))
    assert grid.ndim == 3 and grid.shape[2] == 3
    assert open(txt).read().splitlines() == ["0\ta red circle", "1\ta red circle", "2\t", "3\t"]
    with pytest.raises(ValueError, match="no prompts"):
        sample_to_grid(
            str(tmp_path / "run"), prompts=[], prompts_file=None, num=2, out=str(tmp_path / "x.png")
        )
    with pytest.raises(FileNotFoundError, match="train first"):
        stage_lib.load_stage(str(tmp_path / "missing"))


def test_training_from_the_embedding_cache_matches_encoding_on_the_fly(tmp_path):
    losses = {}
    for cached in (False, True):
        config = tiny_config(num_steps=2, checkpoint_every=2, log_every=1)
        config.data.data_dir = str(tmp_path / "data")
        config.text.train_jointly = False
        config.text.embedding_cache = cached
        config.text.embedding_cache_dtype = "float32"
        workdir = tmp_path / f"run_{cached}"
        state = loop.train_and_evaluate(config, str(workdir))
        losses[cached] = jax.tree.leaves(state.params)
    assert (tmp_path / "run_True" / "text_cache" / "meta.json").exists()
    for a, b in zip(losses[False], losses[True], strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
