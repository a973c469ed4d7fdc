"""Delayed scaling (precision.scaling=delayed), on the GPU:
- kernels: llmq_amax_roll against numpy; every quantizer of a warm slot (history max A) writes the same bytes and
  descale as with current scaling at amax A, and records the true amax; amax-only passes of a warm slot do nothing;
- training: the first micro-step (no history) is bit-identical to current scaling; later (warm) micro-steps'
  gradients match the fp32 PyTorch model as closely as current scaling's; block recompute stays bit-identical;
  evaluating leaves training bit-identical."""
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import pointwise_support as S  # noqa: E402
from harness import KernelProgram, current_device, small_plan  # noqa: E402

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.gpu

H = 4       # the tests' amax history: short, so that rolling it out is quick


@pytest.fixture(scope="module")
def built():
    from llmqgen.plan.schema import Recompute     # norm recompute: the recompute kernels too
    ctx = S.plan_ctx("qwen2", True, current_device().arch, scaling="delayed", amax_history=H,
                     recompute=Recompute(norm=True))
    res, kernels = S.compile_ctx(ctx)
    return ctx, KernelProgram(res.cubin, kernels)


def _stats(amax=0.0, history_max=0.0):
    return torch.tensor([amax, history_max, 0, 0, float("nan"), 0, 0, 0], dtype=torch.float32, device="cuda")


def test_roll_pushes_the_amax_into_the_history_and_clear_drops_it(built):
    ctx, prog = built
    n = ctx["FP8_ACT_SLOTS"]
    rng = np.random.default_rng(0)
    slots = rng.uniform(0, 5, (n, 8)).astype(np.float32)
    slots[1, 0], slots[2, 0], slots[3, 0] = np.nan, np.inf, 0.0
    hist = rng.uniform(0, 3, (n, H)).astype(np.float32)
    hist[3] = 0.0                                   # a slot with no history yet, and no amax: stays cold
    stats, history = torch.tensor(slots, device="cuda"), torch.tensor(hist, device="cuda")
    prog.launch("llmq_amax_roll", stats, history)
    pushed = np.where(np.isfinite(slots[:, 0]), slots[:, 0], 0.0)
    want = np.concatenate([pushed[:, None], hist[:, :-1]], 1)
    np.testing.assert_array_equal(history.cpu().numpy(), want)
    got = stats.cpu().numpy()
    np.testing.assert_array_equal(got[:, 0], 0.0)
    np.testing.assert_array_equal(got[:, 1], want.max(1))
    np.testing.assert_array_equal(got[:, 2:], slots[:, 2:])        # the descale and the rest untouched
    assert got[3, 1] == 0.0
    stats.copy_(torch.tensor(slots, device="cuda"))
    prog.launch("llmq_amax_clear", stats)                          # after an evaluation: amaxes dropped
    cleared = slots.copy()
    cleared[:, 0] = 0.0
    np.testing.assert_array_equal(stats.cpu().numpy(), cleared)


def _cases(ctx, prog):
    """(kernel, inputs, elements written, the amax of what it quantizes) of every quantizer that scales by a
    warm slot's history: the quantize family's (amax from torch) and the fused SwiGLU ones (amax from their
    own amax pass, which rounds exactly as they do)."""
    out = []
    for k in prog.kernels.values():
        if k.name.startswith("llmq_quantize_") and not any(w in k.name for w in ("shard", "_cold_")):  # cold: below
            dtype = torch.float32 if k.meta["src"] == "float" else torch.bfloat16
            x = (torch.randn(k.meta["rows"], k.meta["cols"], device="cuda") * 3).to(dtype)
            out.append((k.name, [x], x.numel(), x.float().abs().max().item()))
    BT, F = ctx["BT"], ctx["F"]
    gu, dh = torch.randn(BT, 2 * F, device="cuda").bfloat16() * 2, torch.randn(BT, F, device="cuda").bfloat16()
    for kernel, amax_pass, inputs, n in (("llmq_swiglu_forward_fp8", "llmq_swiglu_forward_amax", [gu], BT * F),
                                         ("llmq_swiglu_backward_dual", "llmq_swiglu_backward_amax", [dh, gu],
                                          BT * 2 * F)):
        stats = _stats()
        prog.launch(amax_pass, *inputs, stats)
        out.append((kernel, inputs, n, stats[0].item()))
    return out


def test_warm_quantizers_scale_by_the_history_and_record_the_amax(built):
    ctx, prog = built
    torch.manual_seed(0)
    cases = _cases(ctx, prog)
    assert len(cases) >= 5, [c[0] for c in cases]
    for name, inputs, n, true_amax in cases:
        k = prog.kernels[name]
        outs = [a for a, _ in k.args if a in ("out", "out_t", "h")]
        for A in (true_amax * 0.5, true_amax * 2):        # a history below the values saturates them
            cold, warm = _stats(amax=A), _stats(history_max=A)
            got = {}
            for which, stats in (("cold", cold), ("warm", warm)):
                got[which] = [torch.full((n,), 0xFF, dtype=torch.uint8, device="cuda") for _ in outs]
                prog.launch(name, *got[which], *inputs, stats)
            for a, b in zip(got["cold"], got["warm"]):
                assert torch.equal(a, b), f"{name}: warm bytes differ from current scaling at the same amax"
            assert warm[4].item() == cold[4].item() == pytest.approx(A / k.meta["fmax"], rel=1e-6)
            assert warm[0].item() == true_amax, name        # recorded for the history
            assert cold[0].item() == A                      # current scaling records nothing
        print(f"  {name}: warm bytes = current scaling's, amax {true_amax:.4f} recorded")


def test_warm_norms_write_e4m3_and_the_cold_quantize_waits(built):
    """Each norm with an fp8 output: cold, it writes bf16 y and its amax (then llmq_quantize_cold_* converts y);
    warm, it writes y_q instead: the bytes that quantize makes of the cold y at the history's amax."""
    ctx, prog = built
    torch.manual_seed(2)
    BT, C, eps = ctx["BT"], ctx["C"], ctx["EPS"]
    norms = [k for k in prog.kernels.values() if k.meta.get("fp8_out")]
    assert {k.name for k in norms} == {"llmq_rmsnorm_forward_ln1_first", "llmq_rmsnorm_forward_ln1",
                                       "llmq_rmsnorm_forward_ln2", "llmq_rmsnorm_recompute_ln1",
                                       "llmq_rmsnorm_recompute_ln2"}
    cold_q = next(k.name for k in prog.kernels.values() if k.name.startswith("llmq_quantize_cold_")
                  and k.meta["rows"] == BT and k.meta["cols"] == C)
    res, delta = torch.randn(BT, C, device="cuda").bfloat16(), torch.randn(BT, C, device="cuda").bfloat16()
    weight = (torch.randn(C, device="cuda") * 0.5 + 1).bfloat16()
    rstd = torch.rsqrt(res.float().pow(2).mean(-1) + eps)
    for k in norms:
        def args(stats):
            t = {"res_out": torch.empty_like(res), "res_in": res, "res": res, "delta": delta, "weight": weight,
                 "y": torch.full_like(res, float("nan")), "y_q": torch.full((BT * C,), 0xFF, dtype=torch.uint8,
                                                                             device="cuda"),
                 "rstd": rstd.clone() if "recompute" in k.name else torch.empty_like(rstd), "amax": stats}
            return t, [t[a] for a, _ in k.args]
        cold, cold_args = args(_stats())
        prog.launch(k.name, *cold_args)
        assert (cold["y_q"] == 0xFF).all() and not cold["y"].isnan().any(), k.name
        amax = cold["amax"][0].item()
        assert amax == cold["y"].float().abs().max().item()
        for A in (amax * 0.5, amax * 2):
            want = torch.full((BT * C,), 0xFF, dtype=torch.uint8, device="cuda")
            prog.launch(cold_q, want, cold["y"], _stats(amax=A))                 # cold: the quantize converts
            warm, warm_args = args(_stats(history_max=A))
            prog.launch(k.name, *warm_args)
            assert torch.equal(warm["y_q"], want), f"{k.name}: warm e4m3 bytes differ from quantizing its bf16 y"
            assert warm["y"].isnan().all(), f"{k.name}: warm, bf16 y is not written"
            assert warm["amax"][0].item() == amax and warm["amax"][4].item() == pytest.approx(A / 448.0, rel=1e-6)
            untouched = torch.full_like(want, 0xFF)
            prog.launch(cold_q, untouched, cold["y"], warm["amax"])               # warm: the quantize waits
            assert (untouched == 0xFF).all()
        print(f"  {k.name}: warm e4m3 = quantize(cold bf16 y)")


def test_warm_amax_passes_do_nothing(built):
    ctx, prog = built
    BT, F = ctx["BT"], ctx["F"]
    gu, dh = torch.randn(BT, 2 * F, device="cuda").bfloat16(), torch.randn(BT, F, device="cuda").bfloat16()
    launches = [("llmq_swiglu_forward_amax", [gu]), ("llmq_swiglu_backward_amax", [dh, gu])]
    for k in prog.kernels.values():
        if k.name.startswith("llmq_amax_") and "shard" not in k.name and "rows" in k.meta:   # not roll, clear
            dtype = torch.float32 if k.meta["src"] == "float" else torch.bfloat16
            launches.append((k.name, [torch.randn(k.meta["rows"], k.meta["cols"], device="cuda").to(dtype)]))
    for name, inputs in launches:
        warm, cold = _stats(history_max=1.5), _stats()
        prog.launch(name, *inputs, warm)
        prog.launch(name, *inputs, cold)
        assert warm[0].item() == 0.0 and warm[1].item() == 1.5, name
        assert cold[0].item() > 0, name


# ---- training ------------------------------------------------------------------------------------------------

def _trainer(plan):
    from llmqgen.runtime.trainer import Trainer
    from reference import init_params
    tr = Trainer(plan, out_root=tempfile.mkdtemp())
    tr.load_params(init_params(plan.model, seed=1))
    return tr


def test_first_micro_step_is_current_scaling():
    from test_trainer import batches
    current = small_plan("qwen2", True)
    delayed = small_plan("qwen2", True, scaling="delayed", amax_history=H)
    data = batches(current, 1, motif=True)
    out = []
    for plan in (current, delayed):
        tr = _trainer(plan)
        try:
            tr.accumulate(data)
            out.append((tr.loss(), tr.gradients()))
        finally:
            tr.close()
    assert out[0][0] == out[1][0]
    for name, g in out[0][1].items():
        assert np.array_equal(g.view(np.uint8), out[1][1][name].view(np.uint8)), name


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_warm_gradients_match_pytorch(arch):
    """After two optimizer steps every slot is warm: the third step's gradients against the fp32 model, with
    current scaling's tolerance (test_trainer.test_gradients_match_pytorch)."""
    from reference import Reference, assert_close_grads, compare_grads
    from test_trainer import batches
    plan = small_plan(arch, True, scaling="delayed", amax_history=H)
    tr = _trainer(plan)
    try:
        for s in range(2):
            tr.accumulate(batches(plan, 2, seed=10 + s, motif=True))
            tr.optimizer_step(lr=1e-3)
        bs = batches(plan, 2, motif=True)
        tr.accumulate(bs)
        loss, grads, params = tr.loss(), tr.gradients(), tr.params()
    finally:
        tr.close()
    ref = Reference(plan.model, params, device="cuda")
    tokens = torch.tensor(np.concatenate([b.inputs for b in bs]), device="cuda", dtype=torch.long)
    targets = torch.tensor(np.concatenate([b.targets for b in bs]), device="cuda", dtype=torch.long)
    ref_loss, ref_grads = ref.loss_and_grads(tokens, targets)
    stats = compare_grads(grads, ref_grads)
    print(f"\n  {arch} delayed: loss {loss:.5f} vs {ref_loss:.5f}; mean cos {stats['mean_cos']:.5f}, "
          f"mean rel norm err {stats['mean_rel']:.4f}")
    assert abs(loss - ref_loss) / ref_loss < 1e-2, (loss, ref_loss)
    assert_close_grads(stats, 0.99, 0.012)


def _train(plan, steps=6):
    from test_trainer import batches
    tr = _trainer(plan)
    data = batches(plan, plan.batch.grad_accum, seed=5)    # the same step repeated: memorisation must show
    try:
        losses, norms = [], []
        for _ in range(steps):
            tr.accumulate(data)
            losses.append(tr.loss())
            norms.append(tr.optimizer_step(lr=3e-3))
        return losses, norms
    finally:
        tr.close()


def test_recompute_is_bit_identical_and_training_learns():
    from llmqgen.plan.schema import Recompute
    base = dict(scaling="delayed", amax_history=H, L=3, grad_accum=2)
    plain = _train(small_plan("qwen2", True, **base))
    block = _train(small_plan("qwen2", True, recompute=Recompute(block=True), **base))
    norm = _train(small_plan("qwen2", True, recompute=Recompute(norm=True), **base))
    print(f"\n  delayed losses {[f'{x:.4f}' for x in plain[0]]}")
    assert plain == block == norm
    assert all(np.isfinite(plain[0])) and plain[0][-1] < plain[0][0] - 0.3


def test_eval_leaves_training_alone():
    """An evaluation between steps records amaxes of its own forward; they are dropped (llmq_amax_clear), so
    the run's history, and so its training, are those of a run without it."""
    from test_trainer import batches
    plan = small_plan("qwen2", True, scaling="delayed", amax_history=H, grad_accum=2)
    data = batches(plan, 2, seed=1, motif=True)
    states, evals = [], []
    for with_eval in (True, False):
        tr = _trainer(plan)
        try:
            for step in range(4):
                tr.accumulate(data)
                if with_eval and step in (0, 2):
                    evals.append(tr.eval_loss(batches(plan, 1, seed=7)))
                tr.optimizer_step(3e-3)
            states.append(tr.state_tensors())
        finally:
            tr.close()
    print(f"\n  eval losses {evals}")
    assert len(evals) == 2 and all(np.isfinite(evals))
    assert states[0].keys() == states[1].keys()
    for k in states[0]:
        assert np.array_equal(states[0][k].view(np.uint8), states[1][k].view(np.uint8)), k


def test_resume_is_bit_exact():
    """The checkpoint state carries the amax history (checkpoint/layout.py): a run stopped after two steps
    and resumed from its state continues exactly as the uninterrupted run (one GPU)."""
    from test_trainer import batches
    plan = small_plan("qwen2", True, scaling="delayed", amax_history=H, grad_accum=2)
    data = [batches(plan, 2, seed=s, motif=True) for s in range(4)]

    def steps(tr, which):
        out = []
        for s in which:
            tr.accumulate(data[s])
            out.append((tr.loss(), tr.optimizer_step(3e-3)))
        return out

    tr = _trainer(plan)
    try:
        whole, final = steps(tr, range(4)), tr.state_tensors()
    finally:
        tr.close()
    tr = _trainer(plan)
    try:
        first, state = steps(tr, range(2)), tr.state_tensors()
    finally:
        tr.close()
    from llmqgen.runtime.trainer import Trainer
    tr = Trainer(plan, out_root=tempfile.mkdtemp())
    try:
        tr.load_state_tensors(state, 2)
        resumed, after = steps(tr, range(2, 4)), tr.state_tensors()
    finally:
        tr.close()
    print(f"\n  losses {[f'{x:.5f}' for x, _ in whole]}; resumed {[f'{x:.5f}' for x, _ in first + resumed]}")
    assert first + resumed == whole
    assert final.keys() == after.keys()
    for k in final:
        assert np.array_equal(final[k].view(np.uint8), after[k].view(np.uint8)), k
