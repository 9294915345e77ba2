"""Noise-conditioning augmentation: one module, per-example levels in training, a fixed level at sampling,
the same code on both paths, and guidance that drops only the text."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import shapes_sr
from imagen_jax.diffusion import noise_aug, samplers, schedules
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import sampling
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib

SCHEDULE = schedules.get_schedule("cosine")


def test_levels_are_drawn_per_example_within_the_range():
    levels = np.asarray(noise_aug.draw_levels(jax.random.PRNGKey(0), 256, (0.1, 0.3)))
    assert levels.shape == (256,) and len(np.unique(levels)) == 256
    assert levels.min() >= 0.1 and levels.max() <= 0.3
    assert abs(levels.mean() - 0.2) < 0.01  # uniform over the range


def test_level_zero_leaves_the_input_unchanged_and_others_follow_the_forward_process():
    x = jax.random.normal(jax.random.PRNGKey(1), (4, 8, 8, 3))
    same, logsnr = noise_aug.augment(x, jnp.zeros(4), jax.random.PRNGKey(2), SCHEDULE)
    np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
    np.testing.assert_allclose(logsnr, SCHEDULE.logsnr(jnp.zeros(4)))

    levels = jnp.array([0.0, 0.1, 0.3, 0.9])
    noised, logsnr = noise_aug.augment(x, levels, jax.random.PRNGKey(2), SCHEDULE)
    np.testing.assert_allclose(logsnr, SCHEDULE.logsnr(levels))
    eps = jax.random.normal(jax.random.PRNGKey(2), x.shape)
    expected = schedules.diffuse(x, eps, logsnr)  # exactly the forward process at the level's log-SNR
    np.testing.assert_allclose(np.asarray(noised[1:]), np.asarray(expected[1:]), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(noised[0]), np.asarray(x[0]))
    # Variance preserving: unit-variance inputs stay unit variance at any level.
    big = jax.random.normal(jax.random.PRNGKey(3), (2, 64, 64, 3))
    out, _ = noise_aug.augment(big, jnp.array([0.5, 0.9]), jax.random.PRNGKey(4), SCHEDULE)
    np.testing.assert_allclose(np.std(np.asarray(out), axis=(1, 2, 3)), 1.0, atol=0.03)


@pytest.fixture(scope="module")
def sr_stage():
    config = shapes_sr.get_config("tiny")
    config.text.train_jointly = False  # frozen text: the step takes no text weights to train
    stage = stage_lib.build_stage(config)
    make = stage_lib.params_factory(stage, jax.random.PRNGKey(0))
    return dataclasses.replace(stage, params=jax.jit(lambda: nn.unbox(make(None)))())


def test_the_conditioning_changes_with_the_level(sr_stage):
    args, kwargs = stage_lib.unet_inputs(sr_stage, batch=2)
    z = jax.random.normal(jax.random.PRNGKey(5), args[0].shape)
    low = jax.random.normal(jax.random.PRNGKey(6), kwargs["lowres"].shape)
    # A non-zero output layer, so the prediction depends on the conditioning at init.
    unet_params = jax.tree.map(lambda x: x + 0.01, sr_stage.params["unet"])

    def predict(aug_logsnr):
        return sr_stage.unet.apply(
            {"params": unet_params}, z, args[1], args[2], args[3], lowres=low, aug_logsnr=aug_logsnr
        )

    assert not np.allclose(predict(jnp.full((2,), 5.0)), predict(jnp.full((2,), -2.0)))


def test_training_and_sampling_call_the_same_augmentation(sr_stage, monkeypatch):
    calls = []
    real = noise_aug.augment

    def spy(lowres, level, rng, schedule):
        calls.append((lowres.shape, schedule))
        return real(lowres, level, rng, schedule)

    monkeypatch.setattr(noise_aug, "augment", spy)
    config = sr_stage.config
    args, kwargs = stage_lib.unet_inputs(sr_stage, batch=4)
    batch = {"image": args[0], "lowres": kwargs["lowres"], "text_ids": jnp.zeros((4, 84), jnp.int32)}
    batch["text_mask"] = batch["text_ids"] > 0
    optimizer = optax.sgd(0.1)
    structs, _ = state_lib.abstract_train_state(sr_stage, optimizer)
    frozen = {"text": sr_stage.text.params}
    jax.eval_shape(loop.train_step_fn(config, sr_stage, optimizer), structs, batch, frozen)
    assert calls == [((4, 16, 16, 3), sr_stage.schedule)]  # per-example levels on the stage's schedule

    captured = {}
    real_denoise = samplers.make_denoise_fn

    def capture(model_fn, **kw):
        captured.update(kw)
        return real_denoise(model_fn, **kw)

    monkeypatch.setattr(samplers, "make_denoise_fn", capture)
    emb = jnp.zeros((2, 84, sr_stage.text.embed_dim))
    program = functools.partial(
        sampling._sample,
        unet=sr_stage.unet,
        schedule=sr_stage.schedule,
        objective="v",
        sampler="ddim",
        num_steps=2,
        threshold="none",
        percentile=99.5,
        time_grid="uniform",
        shape=(2, 64, 64, 3),
    )
    low = jnp.zeros((2, 32, 32, 3))
    jax.eval_shape(
        program, sr_stage.params["unet"], emb, emb[..., 0] > 0, low, 0.2, jax.random.PRNGKey(0), 3.0, 0.0
    )
    assert calls[-1] == ((2, 32, 32, 3), sr_stage.schedule)  # the sampler used the same function
    cond, uncond = captured["cond"], captured["uncond"]
    # Guidance drops only the text: the augmented low-res image and its level are the same in both.
    assert uncond[2] is cond[2] and uncond[3] is cond[3]
    assert uncond[0] is not cond[0]
