"""Several GPUs on the CPU side: inventories across machines, the collectives choice, equal shards in the
memory table, the collective operations of the schedule per ZeRO level, and the cost of each level."""
from math import prod

import pytest

from llmqgen.plan.schedule import build_schedule, iter_ops
from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.inventory import parse_inventory
from llmqgen.hardware.spec import Inventory
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.cost import step_cost
from llmqgen.plan.memory import memory_table, param_tensors, shard_elems
from llmqgen.plan.schema import Batch, Plan, Sharding
from llmqgen.plan.solver import solve


def plan(zero=1, gpus=2, gpu="h200", nodes=1, **kw):
    return Plan(name="t", model=resolve_model("0.5b"),
                inventory=Inventory(gpu=resolve_gpu(gpu), count=gpus, nodes=nodes, host_mem_bytes=1 << 40),
                batch=Batch(micro_batch=4, seq_len=1024, grad_accum=1), sharding=Sharding.from_zero(zero), **kw)


def test_inventory_across_machines():
    inv = parse_inventory("2x8xh100", "512G")
    assert (inv.nodes, inv.count, inv.label) == (2, 8, "2x8xh100")
    assert parse_inventory("4x4090", "64G").nodes == 1
    with pytest.raises(ValueError, match="collectives=nccl"):
        plan(nodes=2)                                   # copy engines cannot reach another machine
    assert plan(nodes=2, collectives="nccl").num_gpus == 4


def test_solver_picks_the_transport_from_the_links():
    m = resolve_model("0.5b")
    nvlink = solve(m, parse_inventory("2xh200", "256G"))
    pcie = solve(m, parse_inventory("2x4090", "128G"))
    nodes = solve(m, parse_inventory("2x2xh200", "256G"))
    assert (nvlink.collectives, nvlink.peer_copies) == ("copy_engine", True)
    assert (pcie.collectives, pcie.peer_copies) == ("copy_engine", False)
    assert nodes.collectives == "nccl"
    assert nvlink.sharding.zero == 1 and pcie.sharding.zero == 1    # fewer bytes than ZeRO-0, less memory


@pytest.mark.parametrize("gpus", [2, 3, 4, 8])
def test_rows_split_into_equal_shards(gpus):
    rows = {r.name: r for r in memory_table(plan(zero=3, gpus=gpus))}
    for name, shape, per_layer, is_matrix in param_tensors(plan(zero=3, gpus=gpus)):
        S = shard_elems(prod(shape), gpus)
        assert S % 16 == 0 and S * gpus >= prod(shape) > S * (gpus - 1) - 16 * gpus
        assert rows[f"master.{name}"].shape == (S,) and rows[f"adam_m.{name}"].shape == (S,)
        whole_bytes = S * gpus * (1 if rows[f"grads.{name}"].dtype == "e4m3" else 2)
        if per_layer:
            assert rows[f"grads.{name}"].shape == (S,) and rows[f"weights.{name}"].shape == (S,)
            assert rows[f"stage.grads.{name}"].bytes >= whole_bytes and rows[f"stage.grads.{name}"].count == 2
        else:       # written whole by the embedding / head kernels: whole, padded to N shards
            assert rows[f"grads.{name}"].bytes >= whole_bytes


def test_staging_rows_follow_the_transport():
    names = lambda p: {r.name: r for r in memory_table(p)}        # noqa: E731
    peer, host, nccl = names(plan(peer_copies=True)), names(plan()), names(plan(collectives="nccl"))
    assert "comm.recv" in peer and "comm.host" not in peer
    assert host["comm.host"].place == "host" and host["comm.host"].bytes == host["comm.recv"].bytes
    assert "comm.recv" not in nccl and "comm.host" not in nccl
    assert "comm.recv" not in names(plan(gpus=1, zero=0))


def _collectives(p):
    s = build_schedule(p)
    return ([(op["kind"], op.get("tag")) for op in iter_ops(s) if op["op"] == "collective"],
            [op["tag"] for op in iter_ops(s) if op["op"] == "await"])


@pytest.mark.parametrize("zero,want,awaits", [
    (0, [("reduce_scatter", None), ("all_gather", None)], []),
    (1, [("reduce_scatter", None), ("all_gather", None), ("all_reduce_max", None), ("all_gather", None)], []),
    (2, [("reduce_scatter", "g[l]"), ("reduce_scatter", None), ("all_gather", None), ("all_reduce_max", None),
         ("all_gather", None)], ["g[l+2]"]),
    (3, [("all_gather", "w[0]"), ("all_gather", "w[l+1]"), ("all_gather", "w[l-1]"), ("reduce_scatter", "g[l]"),
         ("reduce_scatter", None), ("all_gather", None), ("all_reduce_max", None), ("all_gather", None)],
     ["w[l]", "w[l]", "g[l+2]"]),
])
def test_schedule_collectives_per_zero_level(zero, want, awaits):
    got, got_awaits = _collectives(plan(zero=zero))
    assert got == want and got_awaits == awaits
    if zero in (1, 2):      # one GPU: ZeRO-1/2 shard over nothing, no plan; ZeRO-3 streams weights from host
        with pytest.raises(ValueError, match="ZeRO-1 and ZeRO-2 have nothing to shard over there"):
            plan(zero=zero, gpus=1)
    else:
        assert _collectives(plan(zero=zero, gpus=1)) == ([], [])     # one GPU: nothing to exchange


def test_sharded_optimizer_updates_shards_and_zeroes_whole_gradients():
    s = build_schedule(plan(zero=1))
    opt = [op for sec in s["optimizer_step"].values() for op in sec]
    adam = [op for op in opt if op["op"] == "kernel" and op["kernel"].startswith("llmq_adamw")]
    assert adam and all(op["args"]["grad"].endswith("@shard") for op in adam)
    quant = [op["kernel"] for op in opt if op["op"] == "kernel" and "quantize" in op["kernel"]]
    assert quant and all(k.startswith("llmq_quantize_shard_") for k in quant)
    zeroed = {op["dst"] for op in opt if op["op"] == "memset" and op["dst"].startswith("grads.")}
    assert zeroed == {f"grads.{n}" for n, *_ in param_tensors(plan(zero=1))}


def test_zero1_moves_fewer_bytes_than_zero0_in_fp8():
    c0, c1 = step_cost(plan(zero=0, gpu="4090")), step_cost(plan(zero=1, gpu="4090"))
    assert c1.breakdown_ms["collectives"] < c0.breakdown_ms["collectives"]


def test_peer_copies_pinned_on_or_off():
    """Pinned on for GPUs without peer access: refused (the runtime would have no host path); pinned off where
    the GPUs have it: the reason names the pin, not a missing capability."""
    from llmqgen.plan.solver import solve
    with pytest.raises(ValueError, match="RTX 4090 has no peer access .*: drop it"):
        solve(resolve_model("qwen2.5-0.5b"), parse_inventory("2x4090", "256G"), pins={"peer_copies": True})
    off = solve(resolve_model("qwen2.5-0.5b"), parse_inventory("2xH200", "256G"), pins={"peer_copies": False})
    assert off.estimate.reasons["collectives"] == ("copy engines through pinned host memory: peer copies off "
                                                   "(--set peer_copies=false)")


def test_one_gpu_weight_streaming_is_named_in_the_offload_reason():
    p = solve(resolve_model("qwen2.5-0.5b"), parse_inventory("1xH200", "256G"), pins={"sharding.weights": True})
    assert p.estimate.reasons["offload"].startswith("none but the block weights, streamed from pinned host memory")
