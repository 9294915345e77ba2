"""benchmarks/sharding_plan.py: per-device state bytes from the shardings, against the replicated preset and
against XLA's own count of the compiled step's arguments, on the tests' 8 fake CPU devices."""

import pathlib
import sys

import pytest

from configs import bench_tiny, imagen_base64
from configs.shapes import get_config

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks"))

import sharding_plan  # noqa: E402

FSDP_MESH = (("data", 1), ("fsdp", -1), ("tensor", 1))
GROUPS = ("params", "ema_params", "opt_state")


def _quiet(_: str) -> None:
    pass


def test_fsdp_splits_the_state_over_the_devices_and_dp_replicates_it():
    config = bench_tiny.get_config()  # 4.6M parameters: kernels up to 3x3x256x128, above min_shard_size
    dp = sharding_plan.plan(config, preset="dp", mesh=FSDP_MESH, compile_step=False, log=_quiet)
    fsdp = sharding_plan.plan(config, preset="fsdp", mesh=FSDP_MESH, compile_step=False, log=_quiet)
    assert dp["devices"] == fsdp["devices"] == 8 and fsdp["mesh"]["fsdp"] == 8
    for group in GROUPS:
        d, f = dp["state"][group], fsdp["state"][group]
        assert d["full_bytes"] == f["full_bytes"] > 0
        # dp: every device holds every leaf whole.
        assert d["bytes_per_device"] == d["max_device_bytes"] == d["full_bytes"]
        assert d["replicated_leaves"] == d["leaves"] and d["sum_over_devices_bytes"] == 8 * d["full_bytes"]
        # fsdp: the large kernels split 8 ways, small leaves (norms, biases, Adafactor's factored moments)
        # stay whole, so a device holds between 1/8 and 1/4 of the replicated bytes.
        assert d["bytes_per_device"] / 8 <= f["bytes_per_device"] <= d["bytes_per_device"] / 4, group
        assert 0 < f["replicated_leaves"] < f["leaves"]
        # Consistent: every device the same share (the rules only split dimensions they divide), one
        # device's shard_shape matches the exact slices, and the replicas add up to at least the whole.
        assert f["max_device_bytes"] == f["min_device_bytes"] == f["bytes_per_device"]
        assert f["sum_over_devices_bytes"] == 8 * f["bytes_per_device"] >= f["full_bytes"]
        assert f["sum_over_devices_bytes"] - f["full_bytes"] == 7 * f["replicated_bytes_per_device"]
    # The largest kernel is split 8 ways along one dimension.
    big = fsdp["state"]["params"]["largest_shard"]
    assert big["shard_bytes"] * 8 == big["full_bytes"] and "fsdp" in big["spec"]
    assert dp["state"]["params"]["largest_shard"]["shard_bytes"] == big["full_bytes"]
    total = fsdp["state"]["total"]
    assert total["bytes_per_device"] == sum(fsdp["state"][g]["bytes_per_device"] for g in (*GROUPS, "other"))
    assert fsdp["state"]["fits_budget"] and fsdp["xla_cpu"] is None


def test_leaf_bytes_of_replicated_and_split_arrays():
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from imagen_jax.parallel import mesh as mesh_lib

    mesh = mesh_lib.make_mesh(FSDP_MESH)
    split = sharding_plan.leaf_device_bytes((16, 3), np.float32, NamedSharding(mesh, PartitionSpec("fsdp")))
    whole = sharding_plan.leaf_device_bytes((16, 3), np.float32, NamedSharding(mesh, PartitionSpec()))
    assert sorted(split) == sorted(d.id for d in jax.devices())
    assert set(split.values()) == {2 * 3 * 4} and set(whole.values()) == {16 * 3 * 4}
    assert sharding_plan.parse_mesh("data=1,fsdp=-1,tensor=1") == FSDP_MESH
    assert sharding_plan.parse_mesh(str(FSDP_MESH)) == FSDP_MESH


def test_compiled_plan_agrees_with_the_shardings():
    """The update program's arguments are the state and the gradients at the sizes the shardings give
    (the donated state is the aliased part), the gradient program's outputs the gradients; the step's
    FLOPs and the collectives GSPMD inserted are reported."""
    config = get_config("tiny")
    config.sharding.min_shard_size = 1024  # the tiny U-Net's kernels are below the default threshold
    result = sharding_plan.plan(config, preset="fsdp", mesh=FSDP_MESH, log=_quiet)
    state, inputs, xla = result["state"], result["inputs"], result["xla_cpu"]
    assert state["params"]["replicated_leaves"] < state["params"]["leaves"]
    assert not inputs["frozen"]["leaves"]  # tiny trains its text encoder jointly: it is in the state
    gradients, update = xla["programs"]["gradients"], xla["programs"]["update"]
    state_bytes, params_bytes = state["total"]["bytes_per_device"], state["params"]["bytes_per_device"]
    loss_bytes = 4  # float32, on every device
    outputs = gradients["output_bytes"] - params_bytes - loss_bytes
    table = 8 * (state["params"]["leaves"] + 1)  # XLA:CPU's table of the output tuple's buffers
    assert outputs == table and gradients["alias_bytes"] == 0, (outputs, table)
    assert update["argument_bytes"] == state_bytes + params_bytes + loss_bytes
    # The donated state is written in place (XLA may leave a few scalars un-aliased).
    assert 0.99 * state_bytes <= update["alias_bytes"] <= state_bytes
    assert xla["total_bytes"] == max(gradients["total_bytes"], update["total_bytes"])
    assert gradients["temp_bytes"] > update["temp_bytes"] > 0 and xla["flops_per_device"] > 0
    assert xla["flops_all_devices"] == pytest.approx(8 * xla["flops_per_device"])
    assert xla["collectives"]["all-gather"]["count"] > 0  # FSDP gathers the split weights
    assert xla["lower_seconds"] > 0 and xla["compile_seconds"] > 0


def test_bench_variant_is_the_paper_unet_and_optimizer():
    """The plan's default config stands for the paper's stage: same U-Net, optimizer, EMA, mesh and
    sharding; only the text source (synthetic 4096-wide, nothing downloaded) and run lengths differ."""
    paper, bench = imagen_base64.get_config("paper"), imagen_base64.get_config("bench")
    assert bench.model.to_dict() == paper.model.to_dict()
    differing = {k for k, v in paper.optim.to_dict().items() if bench.optim[k] != v}
    assert differing <= {"warmup_steps"} and bench.optim.name == "adafactor" and bench.optim.ema_decay > 0
    assert bench.mesh == paper.mesh and bench.sharding.to_dict() == paper.sharding.to_dict()
    assert bench.text.encoder == "random" and bench.text.t5.d_model == 4096  # T5-XXL's width
    assert bench.text.max_length == paper.text.max_length and not bench.text.train_jointly
