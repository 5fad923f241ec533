"""Scale on paper: the HLO reader counts FLOPs and collectives as often as their loops run, the roofline adds up
as written, and `bench plan` runs for the tiny config on 8 fake devices."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import load_config_file
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from nanojax import chips, hlo
from nanojax.benchmarks import plan


def compiled_text(fn, *args):
    return jax.jit(fn).lower(*args).compile().as_text()


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def test_collectives_are_found_with_their_size_group_and_count(mesh):
    x = jax.device_put(jnp.ones((64, 128), jnp.float32), NamedSharding(mesh, P("x")))

    def gather_in_a_loop(a):
        def body(carry, _):
            full = jax.shard_map(lambda s: jax.lax.all_gather(s, "x", tiled=True), mesh=mesh, in_specs=P("x"),
                                 out_specs=P(), check_vma=False)(carry)
            return carry + full.sum(), None
        return jax.lax.scan(body, a, None, length=5)[0]

    costs = hlo.program_costs(compiled_text(gather_in_a_loop, x), 8)
    gathers = [c for c in costs.collectives if c.kind == "all-gather"]
    assert len(gathers) == 1
    assert gathers[0].bytes == 64 * 128 * 4 and gathers[0].groups.shape == (1, 8) and gathers[0].count == 5

    def reduce(a):
        return jax.shard_map(lambda s: (jax.lax.psum(s, "x"), jax.lax.psum_scatter(s, "x", tiled=True)), mesh=mesh,
                             in_specs=P("x"), out_specs=(P(), P("x")), check_vma=False)(a)

    kinds = {c.kind: c for c in hlo.program_costs(compiled_text(reduce, x), 8).collectives}
    assert kinds["all-reduce"].bytes == 8 * 128 * 4  # each device's block, summed over the 8
    assert kinds["reduce-scatter"].bytes == 8 * 128 * 4 and kinds["reduce-scatter"].groups.shape == (1, 8)


def test_matmul_flops_count_every_iteration_of_a_scan():
    x, w = jnp.ones((16, 32)), jnp.ones((3, 32, 32))

    def layers(x, w):
        return jax.lax.scan(lambda h, wl: (jnp.tanh(h @ wl), None), x, w)[0]

    costs = hlo.program_costs(compiled_text(layers, x, w), 1)
    assert costs.flops == 3 * 2 * 16 * 32 * 32
    assert costs.matmul_bytes == 3 * 4 * (16 * 32 + 32 * 32 + 16 * 32)


def test_replica_group_spellings():
    assert hlo.replica_groups("replica_groups={{0,1},{2,3}}", 4).tolist() == [[0, 1], [2, 3]]
    assert hlo.replica_groups("replica_groups=[2,2]<=[2,2]T(1,0)", 4).tolist() == [[0, 2], [1, 3]]
    assert hlo.replica_groups("replica_groups=mesh['a'=2,'b'=2] {'a'}", 4).tolist() == [[0, 2], [1, 3]]
    assert hlo.replica_groups("channel_id=1", 4).tolist() == [[0, 1, 2, 3]]


def test_roofline_arithmetic_by_hand():
    chip = chips.Chip("round", peak_flops=1e12, hbm_bytes=10 * 2**30, hbm_bytes_per_s=1e11, fast_bytes_per_s=1e10,
                      slow_bytes_per_s=1e9, domain=8)
    inside = hlo.Collective("all-gather", 8_000, np.arange(8)[None], count=10)  # 10 x 7,000 B at 1e10 B/s
    across = hlo.Collective("all-reduce", 16_000, np.arange(16)[None], count=1)  # 2 x 15,000 B at 1e9 B/s
    assert plan.collective_seconds(inside, chip) == (pytest.approx(7e-6), False)
    assert plan.collective_seconds(across, chip) == (pytest.approx(3e-5), True)
    costs = hlo.ProgramCosts(flops=2e9, bytes_accessed=9e9, matmul_bytes=1e8, collectives=[inside, across])
    derived = type("D", (), {"flops_per_token": 1e6, "num_devices": 16})()
    config = type("C", (), {"train": type("T", (), {"total_batch_size": 16_000})()})()
    r = plan.roofline(costs, chip, derived, config, memory_bytes=2 * 2**30)
    assert r["compute_s"] == pytest.approx(2e-3) and r["memory_s"] == pytest.approx(1e-3)
    assert r["communication_s"] == pytest.approx(3.7e-5)
    assert r["step_s_overlapped"] == pytest.approx(2e-3) and r["step_s_serial"] == pytest.approx(2.037e-3)
    assert r["bound"].startswith("compute") and r["fits"] is True
    assert r["mfu_overlapped"] == pytest.approx(1e6 * 16_000 / 16 / (2e-3 * 1e12))


def test_targets_and_chips():
    assert chips.parse_target("v6e-256").count == 256 and chips.parse_target("v6e-256").chip.peak_flops == 918e12
    assert chips.parse_target("4x8xH100").count == 32 and chips.parse_target("8xH100").count == 8
    assert chips.peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and chips.peak_flops("TPU v5 lite") == 197e12
    for bad in ("v9z-8", "8xB999", "lots"):
        with pytest.raises(ValueError, match="target|TPU generation"):
            chips.parse_target(bad)


def test_plan_for_the_tiny_config_on_8_devices():
    r = plan.plan_one(load_config_file("tiny"), "8xH100", "", 0, "full")
    assert r["devices"] == 8 and r["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1} and r["fits"] is True
    assert r["xla_flops_per_device"] >= r["model_flops_per_device"] > 0  # remat recomputes, never less
    assert r["collective_bytes_per_device"]["all-gather"] > 0  # FSDP gathers the weights
    assert 0 < r["mfu_serial"] <= r["mfu_overlapped"] <= 1
    assert "| tiny | 8xH100 | 1×8×1" in plan.table([r])
