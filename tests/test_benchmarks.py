"""Benchmark scripts stay runnable: their measuring functions on the tiny config (speed is not asserted
here; targets live in benchmarks/ and README), the MFU peak table, and the imagen-pytorch spec mapping."""

import dataclasses
import gzip
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import bench_small, bench_tiny, imagen_base64
from configs.shapes import get_config
from imagen_jax.data import shapes
from imagen_jax.errors import ConfigError
from imagen_jax.evaluation.shapes_scorer import score_batch
from imagen_jax.parallel import memory
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import build as stage_lib
from imagen_jax.stage import sampling as stage_sampling
from imagen_jax.stage import stacking
from imagen_jax.training import loop
from imagen_jax.training import state as state_lib

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import attention_kernels  # noqa: E402
import checkpoint_integrity  # noqa: E402
import common  # noqa: E402
import layout_probe  # noqa: E402
import param_counts  # noqa: E402
import sampling  # noqa: E402
import train_step  # noqa: E402
import vs_imagen_pytorch  # noqa: E402


def test_train_step_benchmark_reports_flops_and_rate(tmp_path):
    config = get_config("tiny")
    config.text.train_jointly = False
    result = train_step.benchmark(config, "embeddings", iters=2, warmup=1, profile_dir=str(tmp_path))
    assert result["images_per_second"] > 0
    # The profile opens in TensorBoard (xplane) and in ui.perfetto.dev, and names the step's kernels.
    assert list(tmp_path.glob("plugins/profile/*/*.xplane.pb"))
    (perfetto,) = tmp_path.glob("plugins/profile/*/perfetto_trace.json.gz")
    names = {e.get("name", "") for e in json.loads(gzip.decompress(perfetto.read_bytes()))["traceEvents"]}
    assert any(name.endswith("_fusion") or "fusion." in name for name in names), sorted(names)[:20]
    # XLA's count for forward + backward + AdamW must exceed 3x the forward's U-Net parameter MACs.
    assert result["flops_per_image"] > 2 * 3 * result["unet_params"]
    assert result["mfu"] is None  # CPU: FLOP/s only
    assert result["peak_bytes"] > 0


def test_train_step_benchmark_counts_the_lowered_step_not_the_compiled_programs(monkeypatch):
    """XLA's GPU backend compiles convolutions and matrix products into cuDNN/cuBLAS calls that its cost
    analysis of the compiled program leaves out (on the H200 it counted 0.3% of the base U-Net's FLOPs):
    FLOPs and MFU must not depend on what the compiled program's count holds."""
    monkeypatch.setattr(jax.stages.Compiled, "cost_analysis", lambda self: {"flops": 1.0})
    config = get_config("tiny")
    config.text.train_jointly = False
    result = train_step.benchmark(config, "embeddings", iters=0, warmup=0, compile_only=True)
    assert result["flops_per_image"] == result["hardware_flops_per_image"] > 2 * 3 * result["unet_params"]


def test_train_step_flops_count_the_model_whatever_its_attention_kernel():
    """cuDNN's fused attention is one opaque call: XLA counts none of its work, and it lowers for no CPU.
    The model's FLOPs (and the PyTorch-style count) come from the same step with XLA's attention, lowered
    from shapes for the host's CPU, which also counts where the devices are a plugin's (CUDA's) on which
    JAX cannot count a lowered program. The kernel is a runtime choice: the state is the same."""
    config = get_config("tiny")
    config.text.train_jointly = False
    mesh = mesh_lib.make_mesh(config.mesh)
    stage = stage_lib.build_stage(config, mesh)
    optimizer = state_lib.make_optimizer(config.optim, config.train.num_steps)
    state, _ = state_lib.abstract_train_state(stage, optimizer)
    batch = loop.global_batch(train_step.synthetic_batch(config, stage, "ids"), mesh, config.sharding)
    frozen = loop.frozen_inputs(config, stage, state.params)
    counts = []
    for impl in ("xla", "cudnn"):  # the cuDNN stage is counted, never run: no GPU here
        unet = dataclasses.replace(stage, unet=stage.unet.clone(attention_impl=impl))
        args = (config, unet, optimizer, state, batch, frozen)
        counts.append((train_step.model_flops(*args), train_step.matmul_conv_flops(*args)))
    assert counts[0] == counts[1] and min(counts[0]) > 0


def test_attention_kernels_compares_a_kernels_bf16_step_with_the_float32_one():
    """benchmarks/attention_kernels.py, the GPU check that cuDNN's attention trains the same model as XLA's,
    run here with XLA's kernel: bf16 differs from float32 by rounding and no more, and only because the
    weights are moved off the zero-initialised output layers (which would zero every other gradient).
    Asked for cuDNN on a CPU, it says what it needs."""
    config = get_config("tiny")
    config.text.train_jointly = False
    config.model.dtype = "bfloat16"
    config.xla_options.cpu = ""  # the CPU option that bf16 crashes (xla_options.check_model_dtype)
    config.train.batch_size = 8
    result = attention_kernels.compare(config, ["xla"], iters=1)
    (row,) = result["rows"]
    assert 0 < row["loss_relative_error"] < 0.01 and 0 < row["gradients_relative_error"] < 0.05, row
    with pytest.raises(SystemExit, match="needs an NVIDIA GPU"):
        attention_kernels.compare(config, ["cudnn"], iters=1)


def test_train_step_benchmark_with_remat_counts_model_and_hardware_flops():
    config = get_config("tiny")
    config.text.train_jointly = False
    config.model.remat = True
    result = train_step.benchmark(config, "embeddings", iters=1, warmup=1)
    assert result["remat"] and result["images_per_second"] > 0
    # MFU counts the model's FLOPs; the recomputed forward passes show only in the hardware count.
    ratio = result["hardware_flops_per_image"] / result["flops_per_image"]
    assert 1.1 < ratio < 1.5 and result["flops_per_image"] > 2 * 3 * result["unet_params"]
    assert result["hfu"] is None  # CPU


def _tiny_with_a_run_of_blocks(scan: bool):
    config = get_config("tiny")
    config.text.train_jointly = False
    config.model.num_res_blocks = 2  # a run of two identical blocks on the down path
    config.model.scan_blocks = scan
    return config


def test_train_step_benchmark_of_a_scanned_unet_counts_the_unrolled_models_flops():
    """XLA counts a loop body once: with `scan_blocks` the model's FLOPs come from the unrolled step's
    lowering (within a few percent of the compiled count the unrolled form reports); the compile time is
    split into lowering and XLA."""
    results = []
    for scan in (False, True):
        config = _tiny_with_a_run_of_blocks(scan)
        results.append(train_step.benchmark(config, "embeddings", iters=0, warmup=0, compile_only=True))
    unrolled, scanned = results
    assert scanned["flops_per_image"] == pytest.approx(unrolled["flops_per_image"], rel=0.05)
    assert scanned["matmul_conv_flops_per_image"] == unrolled["matmul_conv_flops_per_image"] > 0
    assert scanned["hardware_flops_per_image"] < 0.99 * scanned["flops_per_image"]
    for r in results:
        assert r["compile_seconds"] == pytest.approx(r["lower_seconds"] + r["xla_compile_seconds"])
        assert 100 < r["kernels"] - r["kernels_outside_modules"] < r["kernels"]  # the U-Net's and the rest


def _conv(x, w, stride):
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def test_matmul_conv_flops_count_as_pytorch_counts():
    """A 3x3 convolution, a strided one and a dense layer, differentiated for their weights. For the same
    layers (Conv2d(4, 5, 3, padding=1), Conv2d(5, 6, 3, stride=2, padding=1)) PyTorch's FlopCounterMode
    reports 144,000 FLOPs (torch 2.13): both forward passes, both weight gradients and the strided
    convolution's input gradient, each as large as the forward pass it comes from."""
    x = jnp.ones((2, 8, 8, 4))
    weights = (jnp.ones((3, 3, 4, 5)), jnp.ones((3, 3, 5, 6)), jnp.ones((6, 7)))

    def loss(ws):
        h = _conv(_conv(x, ws[0], 1), ws[1], 2)
        return (h @ ws[2]).sum()

    first, strided = 2 * 2 * 8 * 8 * 5 * 4 * 9, 2 * 2 * 4 * 4 * 6 * 5 * 9
    assert first * 2 + strided * 3 == 144_000
    dense = 2 * (2 * 4 * 4) * 6 * 7  # forward; its gradients: weights and input, each as large
    assert common.matmul_conv_flops(jax.grad(loss), weights) == 144_000 + 3 * dense
    # A scan's body counts once per iteration; a while loop's trip count is unknown.
    a = jnp.ones((7, 11))
    looped = lambda a: jax.lax.scan(lambda c, _: (c @ c.T @ c, None), a, None, length=4)[0]  # noqa: E731
    assert common.matmul_conv_flops(looped, a) == 4 * 2 * (7 * 11 * 7 + 7 * 7 * 11)
    until = lambda a: jax.lax.while_loop(lambda c: c.sum() < 0, lambda c: c @ c.T @ c, a)  # noqa: E731
    with pytest.raises(ValueError, match="while loop"):
        common.matmul_conv_flops(until, a)


def test_model_flops_of_a_scanned_unet_held_stacked_by_shape():
    """With `scan_blocks` and `optim.stack_by_shape` the model's FLOPs come from the unrolled step, whose
    state is grouped differently (a scanned run's blocks are one parameter there): it reads its own
    stacks at its own positions, and counts what the unstacked unrolled step counts."""
    flops = []
    for stack_by_shape in (False, True):
        config = _tiny_with_a_run_of_blocks(scan=True)
        config.optim.stack_by_shape = stack_by_shape
        mesh = mesh_lib.make_mesh(config.mesh, dcn=config.mesh_dcn)
        stage = stage_lib.build_stage(config, mesh)
        optimizer = state_lib.make_optimizer(config.optim, config.train.num_steps)
        state, _ = state_lib.abstract_train_state(stage, optimizer)
        frozen = loop.frozen_inputs(config, stage, state.params)
        host_batch = train_step.synthetic_batch(config, stage, "embeddings")
        batch = loop.global_batch(host_batch, mesh, config.sharding)
        flops.append(train_step.model_flops(config, stage, optimizer, state, batch, frozen))
    assert flops[1] == pytest.approx(flops[0], rel=1e-3) and flops[0] > 0


def test_kernel_counts_fall_when_the_per_parameter_work_runs_once_per_shape():
    """`common.kernel_counts` counts the compiled program's fused kernels: AdamW's update of eight
    same-shaped parameters has fewer of them held stacked by shape (`stage.stacking`) than one by one;
    none is inside a module."""
    optim = get_config("tiny").optim
    plain = state_lib.make_optimizer(optim, 10)
    optim.stack_by_shape = True
    stacked = state_lib.make_optimizer(optim, 10)
    params = {f"p{i}": jnp.full((16, 16), float(i)) for i in range(8)}
    counts = []
    for opt, tree in ((plain, params), (stacked, stacking.stack(params))):
        compiled = jax.jit(opt.update).lower(tree, opt.init(tree), tree).compile()
        counts.append(common.kernel_counts(compiled))
    per_parameter, held = counts
    assert held["kernels"] < per_parameter["kernels"]
    assert all(c["kernels_outside_modules"] == c["kernels"] > 0 for c in counts)


def test_weights_read_at_positions_passed_in_compile_as_fewer_distinct_kernels():
    """The train step reads weights held stacked by shape at positions that are inputs of the program
    (`stacking.positions`): the kernels reading the members of a group are then one kernel to XLA, where
    constant indices make one per member (`common.distinct_kernels`). The gradient, stacked again, is the
    per-parameter gradient either way."""
    names = [f"layer{i}" for i in range(6)]
    keys = jax.random.split(jax.random.PRNGKey(0), 2 * len(names))
    params = {
        n: {
            "w": jax.random.normal(keys[2 * i], (32, 32)) / 6,
            "scale": 1 + jax.random.normal(keys[2 * i + 1], (32,)),
        }
        for i, n in enumerate(names)
    }
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 32))

    def loss(p):
        h = x
        for n in names:
            h = jnp.tanh((h @ p[n]["w"]) * p[n]["scale"])
        return jnp.mean(h**2)

    held = stacking.stack(params)
    positions = stacking.positions(held, jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    assert [int(p) for p in positions] == list(range(len(names)))
    with pytest.raises(ValueError, match="2 positions for a group of 6"):
        stacking.unstacked(held, positions[:2])  # positions made for another grouping

    def stacked_grad(held, positions):
        return stacking.restacked(jax.grad(loss)(stacking.unstacked(held, positions)), held)

    expected = stacking.stack(jax.grad(loss)(params))
    distinct = []
    for read_at in (None, positions):
        step = jax.jit(stacked_grad)
        grads = step(held, read_at)
        for got, want in zip(grads.stacks, expected.stacks, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        distinct.append(common.distinct_kernels(step.lower(held, read_at).compile().as_text()))
    constant, passed_in = distinct
    assert passed_in < constant, distinct


def test_train_step_benchmark_fit_batch_halves_a_batch_that_does_not_fit(monkeypatch):
    """--fit_batch: a batch whose plan exceeds the device limit is halved and compiled again (without the
    flag the step's memory error stands: tests/test_training.py). CPUs report no limit: the first check
    here fakes a tiny one."""
    config = get_config("tiny")
    config.text.train_jointly = False
    limits = iter([1])  # batch 16's check; then CPU's "no limit"
    monkeypatch.setattr(memory, "device_memory_limit", lambda: next(limits, None))
    result = train_step.benchmark(config, "embeddings", iters=1, warmup=0, fit_batch=True)
    assert (result["requested_batch_size"], result["batch_size"]) == (16, 8)
    assert result["images_per_second"] > 0 and config.train.batch_size == 16  # the caller's config kept


def test_train_step_benchmark_with_joint_text_encoder():
    result = train_step.benchmark(get_config("tiny"), "auto", iters=1, warmup=1)
    assert result["text_input"] == "ids"
    assert result["jointly_trained_text_params"] > 0


def test_sampling_benchmark_rows():
    rows = sampling.benchmark(get_config("tiny"), ["ddim"], steps=2, guidance=2.0, batch=8, iters=1)
    (row,) = rows
    assert row["sampler"] == "ddim" and row["batch"] == 8
    assert row["step_images_per_second"] == pytest.approx(row["denoising_steps_per_second"] * 8)


def test_sampling_benchmark_compile_only_compiles_the_one_program_without_running():
    (row,) = sampling.compile_only(get_config("tiny"), batch=2)
    assert row["sampler"] == "any" and row["steps"] == "any" and row["batch"] == 2
    assert row["lower_seconds"] > 0 and row["xla_compile_seconds"] > 0


class _Device:
    def __init__(self, kind):
        self.device_kind = kind


def test_checkpoint_integrity_benchmark_measures_and_plans(tmp_path):
    config = get_config("tiny")
    measured = checkpoint_integrity.measure(config, str(tmp_path / "run"))
    assert measured["checkpoint_bytes_on_disk"] > 0 and measured["restore_verified_seconds"] > 0
    assert measured["digest_seconds_median"] > 0 and measured["manifest_seconds"] > 0
    planned = checkpoint_integrity.plan(config)
    assert planned["state_bytes"] == measured["state_bytes"] and planned["arrays"] == measured["arrays"]
    # Reading the state once is the floor of what XLA's cost analysis counts.
    floor, counted = (
        planned[k]["H100 SXM"]
        for k in ("digest_seconds_reading_the_state_once", "digest_seconds_xla_cost_analysis")
    )
    assert 0 < floor <= counted


def test_peak_flops_table():
    assert common.peak_flops(_Device("NVIDIA H100 80GB HBM3")) == 989e12
    assert common.peak_flops(_Device("TPU v5 lite")) == 197e12
    assert common.peak_flops(_Device("TPU v5p")) == 459e12
    assert common.peak_flops(_Device("cpu")) is None
    assert common.utilisation(494.5e12, _Device("H100"), 1) == pytest.approx(0.5)
    assert common.utilisation(1e12, jax.devices()[0], 1) is None


def test_bench_configs_match_the_issue():
    tiny, small = bench_tiny.get_config(), bench_small.get_config()
    for config, width in ((tiny, 32), (small, 64)):
        m = config.model
        assert m.channels == width and tuple(m.channel_mults) == (1, 2, 4) and m.num_res_blocks == 2
        assert tuple(m.self_attention) == tuple(m.cross_attention) == (False, False, True)
        assert config.data.resolution == 32 and config.train.batch_size == 32
        assert config.text.max_length == 16 and config.text.t5.d_model == 128


@pytest.mark.parametrize("variant", ["paper", "bench"])
def test_paper_base_unet_config_is_the_papers_size(variant):
    """The 64x64 base U-Net of the paper (~2B parameters), counted from shapes alone (nothing allocated)."""
    config = imagen_base64.get_config(variant)
    width, res = param_counts.T5_XXL_WIDTH, config.data.resolution
    assert param_counts.unet_param_count(config) == 2_121_910_275
    m = config.model
    assert (m.channels, tuple(m.channel_mults), m.num_res_blocks, m.head_dim) == (512, (1, 2, 3, 4), 3, 64)
    assert tuple(m.self_attention) == tuple(m.cross_attention) == (False, True, True, True)  # 32, 16, 8
    assert (m.dtype, m.param_dtype, config.text.max_length, res) == ("bfloat16", "float32", 128, 64)
    if variant == "bench":
        assert config.text.encoder == "random" and config.text.t5.d_model == width


def test_imagen_pytorch_spec_mirrors_the_config():
    spec = vs_imagen_pytorch.torch_spec(
        bench_small.get_config(),
        2,
        train_iters=1,
        sample_steps=25,
        sample_batch=0,
        sample_iters=1,
        guidance=3,
    )
    assert spec["dim"] == 64 and spec["dim_mults"] == [1, 2, 4] and spec["num_res_blocks"] == 2
    assert spec["self_attention"] == spec["cross_attention"] == [False, False, True]
    assert spec["heads"] * spec["head_dim"] == 256  # the lowest level's width
    assert (spec["text_len"], spec["text_dim"], spec["image_size"], spec["batch"]) == (16, 128, 32, 32)
    assert spec["sample_batch"] == 32 and spec["threads"] == 2


def test_sampling_compiles_once_per_batch_shape_whatever_the_sampling_options():
    config = get_config("tiny")
    stage = stage_lib.build_stage(config)
    state, _ = state_lib.init_train_state(stage, optax.identity(), jax.random.PRNGKey(0))
    stage = dataclasses.replace(stage, params=state.ema_params)
    prompts = ["a red circle", ""]

    def run(**kw):
        opts = dict(rng=jax.random.PRNGKey(1), sampler="ddim", num_steps=2, guidance=1.0) | kw
        return stage_sampling.generate(stage, prompts, **opts)

    first = run()
    program = stage_sampling.sample_program(config.xla_options)
    compiled = program._cache_size()
    # Every sampling option is an input of the program: none compiles a new one.
    others = [
        dict(guidance=3.0, eta=0.5, rng=jax.random.PRNGKey(2)),
        dict(num_steps=3),
        dict(sampler="dpmpp2m_sde", num_steps=4, time_grid="quadratic"),
        dict(sampler="ddpm", threshold="static"),
        dict(threshold="dynamic", percentile=90.0),
    ]
    for options in others:
        images = run(**options)
        assert images.shape == first.shape and not np.array_equal(images, first), options
    assert program._cache_size() == compiled
    run(batch_size=2 * len(jax.devices()))  # a new batch shape is a new program
    assert program._cache_size() == compiled + 1
    with pytest.raises(ConfigError, match="time grid 'karras'"):
        run(time_grid="karras")
    with pytest.raises(ConfigError, match="0 sampling steps"):
        run(num_steps=0)


def test_layout_probe_reads_the_order_of_true_and_exchanged_layouts():
    scenes = [scene for _, scene in shapes.eval_set(32, seed=3, split="test", p_two=1.0)]
    exchanged = [layout_probe.exchange_places(s) for s in scenes]
    assert all(not shapes.relation_holds(*s.objects, s.relation) for s in exchanged)
    true_images = np.stack([shapes.render(s, 32) for s in scenes])
    exchanged_images = np.stack([shapes.render(s, 32) for s in exchanged])
    to_model = lambda images: images.astype(np.float32) / 127.5 - 1  # noqa: E731
    assert layout_probe.first_object_placed_first(to_model(true_images), scenes).all()
    assert not layout_probe.first_object_placed_first(to_model(exchanged_images), scenes).any()
    # Blurred (as x0 predictions at high noise are) the order still reads.
    small = jax.image.resize(to_model(true_images), (32, 8, 8, 3), "linear")
    blurred = jax.image.resize(small, (32, 32, 32, 3), "linear")
    assert layout_probe.first_object_placed_first(np.asarray(blurred), scenes).mean() >= 0.9
    # The shapes scorer agrees: the exchanged renders get the relation wrong, the true ones right.
    assert score_batch(list(true_images), scenes)["two_objects"]["relation"] >= 0.9
    assert score_batch(list(exchanged_images), scenes)["two_objects"]["relation"] <= 0.1


def test_layout_probe_runs_on_a_stage():
    config = get_config("tiny")
    stage = stage_lib.build_stage(config)
    state, _ = state_lib.init_train_state(stage, optax.identity(), jax.random.PRNGKey(0))
    stage = dataclasses.replace(stage, params=state.ema_params)
    result = layout_probe.probe(stage, num=4, times=[0.95], starts=[0.9], seeds=1)
    assert set(result["from_noise"]) == {"0.95"} and 0 <= result["from_noise"]["0.95"] <= 1
    assert set(result["from_layout"]) == {"0.9_true", "0.9_exchanged"}
    # An untrained U-Net may draw no pair at all: then the relation has no scenes to be scored on.
    assert all(row["relation"] is None or 0 <= row["relation"] <= 1 for row in result["from_layout"].values())
