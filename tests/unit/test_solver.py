"""The solver: the issue's must-fit cases, pins, determinism and the no-fit message."""
import json
import re

import pytest

from llmqgen.hardware.catalog import resolve_gpu
from llmqgen.hardware.spec import Inventory
from llmqgen.models.catalog import resolve_model
from llmqgen.plan.schema import Plan
from llmqgen.plan.solver import NoFitError, solve, usable_device, usable_host

GiB = 2**30


def inv(gpu, count=1, host_gib=None):
    return Inventory(gpu=resolve_gpu(gpu), count=count,
                     host_mem_bytes=(host_gib or 128 * count) * GiB, host_mem_source="user")


def fits(p: Plan) -> bool:
    e = p.estimate
    return e.device_bytes <= usable_device(p.inventory) and e.host_bytes <= usable_host(p.inventory)


def test_05b_on_h200_needs_no_offload_and_no_recompute():
    p = solve(resolve_model("0.5b"), inv("h200"))
    assert fits(p) and p.fp8
    assert p.recompute.names() == [] and p.offload.names() == []
    assert p.tokens_per_step == 524288


def test_7b_fits_one_4060ti():
    p = solve(resolve_model("7b"), inv("4060ti"))
    assert fits(p) and p.fp8
    assert p.estimate.device_bytes <= 16 * GiB


def test_32b_fits_four_4090s_with_offload_and_sharding():
    p = solve(resolve_model("32b"), inv("4090", 4, host_gib=512))
    assert fits(p) and p.fp8
    assert p.sharding.zero >= 2
    assert {"master", "adam_m", "adam_v"} <= set(p.offload.names())
    assert p.recompute.names()


def test_pins_are_respected():
    p = solve(resolve_model("0.5b"), inv("h200"), pins={"recompute.ffn": True, "batch.micro_batch": 4},
              dtype="bf16", seq_len=2048, tokens_per_step=262144)
    assert p.recompute.ffn and p.recompute.swiglu          # ffn implies swiglu
    assert p.batch.micro_batch == 4 and p.batch.grad_accum == 32 and p.batch.seq_len == 2048
    assert p.precision.matmul == "bf16" and p.precision.gradient == "bf16"


def test_deterministic_and_hash_ignores_estimate():
    a = solve(resolve_model("1.5b"), inv("4090"))
    b = solve(resolve_model("1.5b"), inv("4090"))
    assert a.to_json() == b.to_json()
    assert a.inputs_hash() == a.model_copy(update={"estimate": None}).inputs_hash()
    assert Plan.from_json(a.to_json()) == a
    assert json.loads(a.to_json())["schema"] == 1


def test_no_fit_names_the_shortfall():
    with pytest.raises(NoFitError) as e:
        solve(resolve_model("72b"), inv("4060ti", 1, host_gib=32))
    msg = str(e.value)
    assert "does not fit 1x4060ti" in msg and "short" in msg and "--host-mem" in msg


def test_the_closest_plan_is_the_one_nearest_fitting_the_gpu():
    """72B on one 4090 (a fresh user's report): the closest plan fits the GPU with everything offloaded and
    is short of host RAM only, which is what the hint (more --host-mem) adds; not a plan short of both."""
    with pytest.raises(NoFitError) as e:
        solve(resolve_model("72b"), inv("4090", 1, host_gib=128))
    msg = str(e.value)
    device_line = msg.splitlines()[1]
    assert "per GPU" in device_line and "short" not in device_line, msg
    assert "offload=master+adam_m+adam_v+quantized_weights+gradients" in msg and "--host-mem" in msg


def test_no_fit_hints_are_solved_with_the_users_pins():
    """The hints' re-solves keep the pins as given (a later list of the FP8 options asked for once took the
    pins' name, so an FP8 pin made every re-solve fail: "nothing llmqgen tried fits")."""
    with pytest.raises(NoFitError) as e:
        solve(resolve_model("72b"), inv("4090", 1, host_gib=128), pins={"precision.scaling": "delayed"})
    assert "more host RAM (--host-mem" in str(e.value), str(e.value)


def test_a_pinned_micro_batch_too_large_gets_a_smaller_one_as_hint():
    """0.5B fits a 4090 by default: with --micro-batch 512 the first hint is a micro-batch that fits."""
    with pytest.raises(NoFitError) as e:
        solve(resolve_model("0.5b"), inv("4090", 1, host_gib=128),
              pins={"batch.micro_batch": 512, "recompute.block": False, "offload.residual": False})
    hint = re.search(r"a smaller micro-batch \(--micro-batch (\d+)\)", str(e.value))
    assert hint, str(e.value)
    solve(resolve_model("0.5b"), inv("4090", 1, host_gib=128),
          pins={"batch.micro_batch": int(hint.group(1)), "recompute.block": False, "offload.residual": False})


def test_zero_1_or_2_on_one_gpu_is_refused():
    """On one GPU ZeRO-1 and -2 shard over nothing: a pin of either is refused, not turned into a plan that
    only its name tells apart; with sharding.weights (weight streaming) they stand."""
    for key in ("sharding.optimizer", "sharding.gradients"):
        with pytest.raises(ValueError, match="ZeRO-1 and ZeRO-2 have nothing to shard over there"):
            solve(resolve_model("0.5b"), inv("h200"), pins={key: True})
    assert solve(resolve_model("0.5b"), inv("h200", 2), pins={"sharding.optimizer": True}).sharding.optimizer
    streamed = solve(resolve_model("0.5b"), inv("h200"), pins={"sharding.optimizer": True, "sharding.weights": True})
    assert streamed.sharding.weights


def test_fp8_on_a_gpu_without_fp8_is_refused():
    with pytest.raises(ValueError, match="no FP8"):
        solve(resolve_model("0.5b"), inv("3090"), dtype="e4m3")
    assert solve(resolve_model("0.5b"), inv("3090")).precision.matmul == "bf16"


def test_tokens_per_step_must_divide():
    with pytest.raises(ValueError, match=r"multiple of seq_len x GPUs = 1024: pick e.g. 1024 \(or 2048\)"):
        solve(resolve_model("0.5b"), inv("h200"), tokens_per_step=1500)
    with pytest.raises(ValueError, match="less than one sequence"):
        solve(resolve_model("0.5b"), inv("h200"), tokens_per_step=1000)


# --- divisibility rules: the solver picks valid values instead of giving up ------------------------
from llmqgen.plan.solver import check_pins, micro_batch_unit  # noqa: E402


def test_fp8_rows_seq_len_1000_plans_the_suggested_step():
    """Field case fp8-dims-not-multiple-of-16: seq_len 1000 with the suggested 524000 tokens per step."""
    with pytest.raises(ValueError, match=r"pick e.g. 524000 \(or 526000\)") as e:
        solve(resolve_model("0.5b"), inv("h200"), seq_len=1000)
    assert "multiples of 2" in str(e.value)
    p = solve(resolve_model("0.5b"), inv("h200"), seq_len=1000, tokens_per_step=524000)   # the suggestion plans
    assert fits(p) and p.fp8 and p.tokens_per_step == 524000
    assert (p.batch.micro_batch * p.batch.seq_len) % 16 == 0 and p.batch.micro_batch in (2, 4)
    assert all("mb=1x" not in c.summary for c in p.estimate.runners_up)
    p4 = solve(resolve_model("0.5b"), inv("h200"), seq_len=1000, tokens_per_step=524000,
               pins={"batch.micro_batch": 4})
    assert p4.batch.micro_batch == 4 and p4.batch.grad_accum == 131


def test_fp8_rows_seq_len_1001():
    p = solve(resolve_model("0.5b"), inv("h200"), seq_len=1001, tokens_per_step=512512)
    assert p.batch.micro_batch % 16 == 0 and p.tokens_per_step == 512512
    p16 = solve(resolve_model("0.5b"), inv("h200"), seq_len=1001, tokens_per_step=512512,
                pins={"batch.micro_batch": 16})
    assert p16.batch.micro_batch == 16 and p16.batch.grad_accum == 32
    # 100 sequences of 1001 tokens: no micro-batch gives multiples of 16 rows; suggest a step that does
    with pytest.raises(ValueError, match=r"pick e.g. 96096 \(or 112112\)"):
        solve(resolve_model("0.5b"), inv("h200"), seq_len=1001, tokens_per_step=100100)
    # and the suggestion plans
    assert solve(resolve_model("0.5b"), inv("h200"), seq_len=1001, tokens_per_step=96096).batch.micro_batch % 16 == 0


def test_pinned_micro_batch_that_breaks_the_fp8_rule_names_the_ones_that_work():
    with pytest.raises(ValueError, match=r"--micro-batch 1: 1000 token rows.*multiple of 16.*"
                                         r"use --micro-batch 2, 4, 262 or 524"):
        solve(resolve_model("0.5b"), inv("h200"), seq_len=1000, tokens_per_step=524000, pins={"batch.micro_batch": 1})
    with pytest.raises(ValueError, match=r"= 8 x 1000 x 1 = 8000: use --tokens-per-step 520000 \(or 528000\), "
                                         r"or --micro-batch 2, 4, 262 or 524"):
        solve(resolve_model("0.5b"), inv("h200"), seq_len=1000, tokens_per_step=524000, pins={"batch.micro_batch": 8})
    # BF16 has no row rule: micro-batch 1 of 1000 tokens is fine
    p = solve(resolve_model("0.5b"), inv("h200"), seq_len=1000, tokens_per_step=524000, dtype="bf16",
              pins={"batch.micro_batch": 1})
    assert p.batch.micro_batch == 1 and not p.fp8


def test_micro_batch_unit():
    assert micro_batch_unit(1024, True) == 1 and micro_batch_unit(1000, True) == 2
    assert micro_batch_unit(1001, True) == 16 and micro_batch_unit(1001, False) == 1
    assert micro_batch_unit(1024, True, 3) == 3 and micro_batch_unit(1000, True, 3) == 6


def test_pinned_lm_head_chunks_pick_micro_batches_they_divide():
    # 3 chunks of 1024-token rows: only micro-batches that are multiples of 3
    p = solve(resolve_model("0.5b"), inv("h200"), tokens_per_step=1024 * 48, pins={"lm_head_chunks": 3})
    assert p.lm_head_chunks == 3 and p.batch.micro_batch % 3 == 0
    with pytest.raises(ValueError, match=r"divisible by lm_head_chunks=3.*pick e.g. 522240 \(or 525312\)"):
        solve(resolve_model("0.5b"), inv("h200"), pins={"lm_head_chunks": 3})


def test_pinned_grad_accum_fixes_the_micro_batch():
    p = solve(resolve_model("0.5b"), inv("h200"), pins={"batch.grad_accum": 16})
    assert p.batch.grad_accum == 16 and p.batch.micro_batch == 32
    with pytest.raises(ValueError, match="grad_accum=7 does not divide"):
        solve(resolve_model("0.5b"), inv("h200"), pins={"batch.grad_accum": 7})


def test_fp8_needs_widths_of_16():
    m = resolve_model("0.5b").model_copy(update={"intermediate_size": 4856})   # 4856 % 16 == 8
    with pytest.raises(ValueError, match="intermediate_size 4856.*--dtype bf16"):
        solve(m, inv("h200"), dtype="e4m3")
    p = solve(m, inv("h200"))                  # automatic dtype: BF16, and the plan says why
    assert not p.fp8 and "intermediate_size 4856" in p.estimate.reasons["precision"]


@pytest.mark.parametrize("kw,match", [
    (dict(seq_len=0), "at least 16 tokens"), (dict(seq_len=-5), "at least 16 tokens"),
    (dict(seq_len=100000), "max_position_embeddings 32768"),
    (dict(tokens_per_step=100), r"less than one sequence.*--tokens-per-step 1024"),
    (dict(tokens_per_step=0), "less than one sequence"),
    (dict(pins={"batch.micro_batch": 0}), "batch.micro_batch takes an integer >= 1"),
    (dict(name="a/b"), "plain file name"), (dict(name="../x"), "plain file name"), (dict(name=""), None),
])
def test_bad_inputs_are_one_line_errors(kw, match):
    if kw.get("name") == "":            # an empty name means the default
        assert solve(resolve_model("0.5b"), inv("h200"), **kw).name == "qwen2.5-0.5b-e4m3-1xh200"
        return
    with pytest.raises(ValueError, match=match) as e:
        solve(resolve_model("0.5b"), inv("h200"), **kw)
    assert "\n" not in str(e.value)


def test_check_pins():
    assert check_pins({"recompute.ffn": True, "precision.matmul": "BF16"}) == {"recompute.ffn": True,
                                                                              "precision.matmul": "bf16"}
    with pytest.raises(ValueError, match=r"not a plan input; valid keys: precision\.\{matmul,"):
        check_pins({"nonexistent.key": 1})
    with pytest.raises(ValueError, match="did you mean recompute.ffn"):
        check_pins({"recompute.fnn": True})
    with pytest.raises(ValueError, match="recompute.ffn takes true or false"):
        check_pins({"recompute.ffn": "maybe"})
    assert check_pins({"recompute.ffn": 1, "offload.residual": 0}) == {"recompute.ffn": True,
                                                                       "offload.residual": False}
    with pytest.raises(ValueError, match=r"--set recompute.ffn=2: recompute.ffn takes true or false"):
        check_pins({"recompute.ffn": 2})
    with pytest.raises(ValueError, match=r"--set lm_head_chunks=yes: "):
        check_pins({"lm_head_chunks": True}, {"lm_head_chunks": "yes"})
    with pytest.raises(ValueError, match="collectives takes one of copy_engine, nccl"):
        check_pins({"collectives": "mpi"})
    with pytest.raises(ValueError, match="lm_head_chunks takes an integer >= 1"):
        check_pins({"lm_head_chunks": 0})
    with pytest.raises(ValueError, match="is not a plan input"):
        check_pins({"name": "x"})       # identity, not an input


def test_pins_that_contradict_each_other_are_one_line():
    with pytest.raises(ValueError, match="no valid plan: precision: FP8 matmuls need FP8 activation gradients"):
        solve(resolve_model("0.5b"), inv("h200"), pins={"precision.gradient": "bf16"})
    with pytest.raises(ValueError, match="disagree"):
        solve(resolve_model("0.5b"), inv("h200"), dtype="bf16", pins={"precision.matmul": "e4m3"})


def test_no_fit_hints_are_solved_and_fit():
    """Every hint shown was re-solved and fits: 72B on a 16 GB card needs ~759 GiB of host RAM (not just
    its closest plan's shortfall); more GPUs or shorter sequences need no less host RAM, so are not shown."""
    import re
    with pytest.raises(NoFitError) as e:
        solve(resolve_model("72b"), inv("4060ti", 1, host_gib=32), seq_len=1000, tokens_per_step=2000)
    msg = str(e.value)
    assert "each solved and fits" in msg and "--gpus" not in msg and "--seq-len" not in msg
    gib = int(re.search(r"--host-mem (\d+)G", msg).group(1))
    p = solve(resolve_model("72b"), inv("4060ti", 1, host_gib=gib), seq_len=1000, tokens_per_step=2000)
    assert fits(p)
    with pytest.raises(NoFitError):       # the least that fits: one GiB less does not
        solve(resolve_model("72b"), inv("4060ti", 1, host_gib=gib - 1), seq_len=1000, tokens_per_step=2000)


def test_no_fit_gpu_hint_plans_with_its_tokens_per_step():
    """A --gpus hint names a step the new GPU count divides, and plans as printed (the helper run on
    its own: 3 sequences do not split over 2 GPUs)."""
    import re
    from llmqgen.plan.solver import _fit_hints
    again = dict(model=resolve_model("7b"), seq_len=1024, tokens_per_step=1024 * 3, dtype="e4m3", pins={})
    hints = _fit_hints(inv("h200", 1, host_gib=8), again, True, None)
    assert any("--gpus" in h for h in hints)
    for h in hints:
        m = re.search(r"--gpus (\d+)x(\w+)", h)
        if m:
            assert "--tokens-per-step 2048 (or 4096)" in h
            host = re.search(r"--host-mem (\d+)G", h)
            p = solve(resolve_model("7b"), inv(m.group(2), int(m.group(1)), host_gib=int(host.group(1)) if host else 8),
                      tokens_per_step=2048)
            assert fits(p)


def test_offload_only_when_it_buys_more_than_the_margin():
    """72B on 2x8 H200: a plan offloading less within 2% of the fastest wins, and the offload reason
    says what it buys or that it is needed to fit (never 'too small otherwise' when it is not)."""
    from llmqgen.plan import calibration as K
    from llmqgen.plan.solver import _rank
    i = Inventory(gpu=resolve_gpu("h200"), count=8, nodes=2, host_mem_bytes=2048 * GiB, host_mem_source="user")
    fitting = []
    p = solve(resolve_model("72b"), i, _collect=fitting)
    fitting.sort(key=_rank)
    why = p.estimate.reasons["offload"]
    assert "too small otherwise" not in why
    mine = set(p.offload.names())
    less = [c for c in fitting if set(c.plan.offload.names()) < mine]
    if mine and less:
        assert _rank(less[0]) > _rank(fitting[0]) * (1 + K.OFFLOAD_MARGIN)
        assert "faster than the fastest plan offloading less" in why
    elif mine:
        assert "needed to fit" in why
    else:
        assert why.startswith("none")
    for c in p.estimate.runners_up:      # a faster runner-up says why it lost
        assert "slower" in c.why_not or "margin" in c.why_not


def test_offload_margin_prefers_no_offload_within_2_percent():
    from llmqgen.plan.solver import _prefer_less_offload

    class P:                       # the fields _rank and _prefer_less_offload read
        def __init__(self, ms, off):
            from types import SimpleNamespace as NS
            self.cost = NS(step_ms=ms)
            self.plan = NS(offload=NS(names=lambda: list(off)), sharding=NS(zero=1))
    fast, plain = P(100.0, ["adam_m", "adam_v"]), P(101.5, [])
    assert _prefer_less_offload([fast, plain]) is plain
    far = P(102.5, [])
    assert _prefer_less_offload([fast, far]) is fast


def test_a_pin_the_chosen_plan_has_leaves_the_choice_alone():
    """A fresh user's report: 7B on a 4060 Ti, and the same with --set recompute.ffn=false (which the chosen
    plan has), gave different plans: the pin turned the recompute ladder's rungs into choices the unpinned
    search never tried (swiglu+norm+qkv). Every recompute choice is a candidate now."""
    from llmqgen.plan.solver import RECOMPUTE_LATTICE
    assert {"swiglu": True, "norm": True, "qkv": True} in RECOMPUTE_LATTICE and len(RECOMPUTE_LATTICE) == 19
    free = solve(resolve_model("7b"), inv("4060ti", 1, host_gib=128))
    assert not free.recompute.ffn
    for pin in ({"recompute.ffn": False}, {"recompute.block": False}, {"batch.micro_batch": free.batch.micro_batch}):
        pinned = solve(resolve_model("7b"), inv("4060ti", 1, host_gib=128), pins=pin)
        assert (pinned.recompute, pinned.offload, pinned.batch, pinned.lm_head_chunks) == \
            (free.recompute, free.offload, free.batch, free.lm_head_chunks), pin


def test_7b_on_4090_offload_reason_is_true():
    p = solve(resolve_model("7b"), inv("4090", 1, host_gib=128), pins={"batch.micro_batch": 16})
    why = p.estimate.reasons["offload"]
    assert p.offload.names() and ("needed to fit" in why or "faster than the fastest plan offloading less" in why)


# --- pins are constraints (issue 10) ---------------------------------------------------------------
def test_pinned_false_recompute_holds_for_the_plan_and_its_runners_up():
    """7B on a 4090 would list runners-up with ffn recompute (block implies it); pinned off, none does."""
    p = solve(resolve_model("7b"), inv("4090", 1, host_gib=128), pins={"recompute.ffn": False})
    assert not p.recompute.ffn and not p.recompute.block
    assert p.estimate.runners_up
    for c in p.estimate.runners_up:
        assert "ffn" not in c.summary and "block" not in c.summary, c.summary


def test_pins_apply_after_implications():
    """A rung's implications first, then the pins: ffn=false keeps the other flags of a block rung."""
    from llmqgen.plan.solver import _recompute_with_pins
    flags = _recompute_with_pins({"block": True}, {"recompute.ffn": False})
    assert flags == {"swiglu": True, "norm": True, "ffn": False, "qkv": True, "attention": True, "block": False}
    flags = _recompute_with_pins({"ffn": True}, {"recompute.swiglu": False})
    assert not flags["ffn"] and not flags["swiglu"]
    assert _recompute_with_pins({}, {"recompute.attention": True})["attention"]


@pytest.mark.parametrize("pins,match", [
    ({"recompute.block": True, "recompute.ffn": False}, "recompute.block implies recompute.ffn"),
    ({"recompute.ffn": True, "recompute.swiglu": False}, "recompute.ffn implies recompute.swiglu"),
    ({"recompute.attention": True, "recompute.qkv": False}, "recompute.attention implies recompute.qkv"),
])
def test_conflicting_pins_are_refused_in_one_line(pins, match):
    with pytest.raises(ValueError, match=match) as e:
        solve(resolve_model("0.5b"), inv("h200"), pins=pins)
    assert "\n" not in str(e.value) and "conflict" in str(e.value)


def test_plan_name_carries_its_choices():
    m, i = resolve_model("0.5b"), inv("h200")
    assert solve(m, i).name == "qwen2.5-0.5b-e4m3-1xh200"                    # unpinned: unchanged
    p = solve(m, i, pins={"recompute.block": True, "batch.micro_batch": 16})
    assert p.name == "qwen2.5-0.5b-e4m3-1xh200-mb16-rc-block"
    assert solve(m, i, pins={"recompute.ffn": False}).name == "qwen2.5-0.5b-e4m3-1xh200-no-rc-ffn"
    assert solve(m, i, seq_len=2048).name == "qwen2.5-0.5b-e4m3-1xh200-seq2048"
    assert solve(m, i, pins={"offload.adam_m": True, "offload.adam_v": True, "lm_head_chunks": 4}).name == \
        "qwen2.5-0.5b-e4m3-1xh200-lmc4-off-adam_m+adam_v"
    assert solve(m, i, pins={"recompute.ffn": True}, name="mine").name == "mine"      # --name wins


def test_reasons_quote_the_margin_applied_and_only_what_memory_buys():
    """A faster plan that lost is said to be under the margin that applied (ZeRO levels and offload
    summed), never a smaller one; "buys" names only gains (a larger micro-batch, less recompute)."""
    import re
    p = solve(resolve_model("32b"), inv("4090", 4, 512))
    e = p.estimate
    quoted = [re.search(r"([\d.]+)% faster.*under the (\d+)% margin \(", t)
              for t in [e.reasons["sharding"]] + [c.why_not for c in e.runners_up]]
    assert any(quoted), e.reasons["sharding"]
    for m in filter(None, quoted):
        assert float(m.group(1)) < float(m.group(2)), m.string
    p = solve(resolve_model("7b"), inv("4060ti", 1, 128))
    for text in p.estimate.reasons.values():
        for a, b in re.findall(r"micro-batch (\d+) \(not (\d+)\)", text):
            assert int(a) > int(b), text


def test_pinned_reasons_say_which_pin():
    p = solve(resolve_model("0.5b"), inv("h200", 1, 128), pins={"recompute.ffn": False, "collectives": "nccl"})
    r = p.estimate.reasons
    assert "recompute.ffn=false pinned by the user, the rest chosen" in r["recompute"]
    assert r["collectives"].startswith("nccl:") and p.collectives == "nccl"
