"""The real training loop (runtime/run.py) on CPU with the GPU Trainer stood in (tests/fake_trainer.py):
checkpoints as `llmqgen run` writes them, read by resume and `llmqgen export` through one reader; damaged
checkpoints; the run's saved settings on resume; non-finite steps skipped; SIGTERM; eval forward-only."""
import json
import logging
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_trainer import FakeTrainer, TINY, tiny_data, tiny_plan  # noqa: E402

from llmqgen.checkpoint.safetensors import read_dir, read_header  # noqa: E402
from llmqgen.checkpoint.store import CheckpointError, read_checkpoint  # noqa: E402
from llmqgen.cli import main  # noqa: E402
from llmqgen.runtime.log import read_log  # noqa: E402


def train(run, data, out, **kw):
    return run.train(tiny_plan(), run.RunConfig(data=data, out=out, **kw))


def logged(caplog, level=logging.INFO) -> list[str]:
    """The messages llmqgen logged at `level` (what the command line prints)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("llmqgen") and r.levelno == level]


def same_dir(a: Path, b: Path) -> bool:
    x, y = read_dir(a), read_dir(b)
    return set(x) == set(y) and all(x[k].dtype == y[k].dtype and np.array_equal(x[k].view(np.uint8),
                                                                                 y[k].view(np.uint8)) for k in x)


# --- export (issue 14.1) -------------------------------------------------------------------------------

def test_checkpoint_holds_typed_state_and_records_settings(run, data, tmp_path):
    train(run, data, tmp_path / "r", steps=3, warmup=1, lr=1e-3)
    ck = tmp_path / "r" / "checkpoints" / "step-000003"
    header = read_header(ck / "tensors.safetensors")[0]
    assert header["master.layers.0.qkv"]["dtype"] in ("BF16", "F32") and len(header["master.layers.0.qkv"]["shape"]) == 2
    st = json.loads((ck / "state.json").read_text())
    assert st["run"]["lr"] == 1e-3 and st["run"]["steps"] == 3 and st["run"]["schedule"] == "cosine"
    assert set(st["files"]) == {"tensors.safetensors", "plan.json"}


@pytest.mark.parametrize("which", ["run", "checkpoints", "step"])
def test_export_equals_the_runs_own_export(run, data, tmp_path, which):
    out = tmp_path / "r"
    train(run, data, out, steps=3, warmup=1, checkpoint_every=1)
    src = {"run": out, "checkpoints": out / "checkpoints", "step": out / "checkpoints" / "step-000003"}[which]
    res = CliRunner().invoke(main, ["export", str(src), str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "tiny-qwen2 at step 3" in res.output
    assert same_dir(tmp_path / "hf", out / "model")         # bit for bit
    assert (tmp_path / "hf" / "config.json").read_text() == (out / "model" / "config.json").read_text()


def test_export_older_step_and_resume_read_the_same_state(run, data, tmp_path):
    out = tmp_path / "r"
    train(run, data, out, steps=2, warmup=1, checkpoint_every=1)
    res = CliRunner().invoke(main, ["export", str(out), str(tmp_path / "hf1"), "--step", "1"])
    assert res.exit_code == 0, res.output
    ck = read_checkpoint(out / "checkpoints", 1)
    params = ck.params()
    hf = read_dir(tmp_path / "hf1")
    assert np.array_equal(hf["model.norm.weight"].view(np.uint16),
                          params["final_norm"].astype(hf["model.norm.weight"].dtype).view(np.uint16))


def test_export_of_a_damaged_latest_uses_the_newest_intact(run, data, tmp_path):
    out = tmp_path / "r"
    train(run, data, out, steps=3, warmup=1, checkpoint_every=1)
    (out / "checkpoints" / "step-000003" / "tensors.safetensors").unlink()
    res = CliRunner().invoke(main, ["export", str(out), str(tmp_path / "hf")])
    assert res.exit_code == 0, res.output
    assert "warning: checkpoint step-000003 is damaged (tensors.safetensors is missing); using step-000002" in res.output
    assert "at step 2" in res.output



def _export_refused(*args) -> str:
    """One `error:` line, exit 2, no traceback."""
    res = CliRunner().invoke(main, ["export", *map(str, args)])
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert len(res.output.strip().splitlines()) == 1 and res.output.startswith("error: "), res.output
    return res.output


def test_export_of_a_step_directory_refuses_another_step(run, data, tmp_path):
    out = tmp_path / "r"
    train(run, data, out, steps=2, warmup=1, checkpoint_every=1)
    step1 = out / "checkpoints" / "step-000001"
    assert "step 2 was asked for" in _export_refused(step1, tmp_path / "hf", "--step", "2")
    assert not (tmp_path / "hf").exists()
    res = CliRunner().invoke(main, ["export", str(step1), str(tmp_path / "hf"), "--step", "1"])  # agrees: fine
    assert res.exit_code == 0 and "at step 1" in res.output, res.output


@pytest.mark.parametrize("size", ["nan", "inf", "0", "-3"])
def test_export_shard_size_must_be_positive_and_finite(run, data, tmp_path, size):
    train(run, data, tmp_path / "r", steps=1, warmup=0)
    assert "is not a positive number of GiB" in _export_refused(tmp_path / "r", tmp_path / "hf", "--shard-size", size)
    assert not (tmp_path / "hf").exists()


def test_export_of_a_checkpoint_with_an_incomplete_plan_is_one_line(run, data, tmp_path):
    import hashlib
    train(run, data, tmp_path / "r", steps=1, warmup=0)
    ck = tmp_path / "r" / "checkpoints" / "step-000001"
    plan = json.loads((ck / "plan.json").read_text())
    del plan["batch"]["seq_len"], plan["model"]["hidden_size"]
    (ck / "plan.json").write_text(json.dumps(plan))
    state = json.loads((ck / "state.json").read_text())     # recorded as written: not a damaged checkpoint
    state["files"]["plan.json"] = {"bytes": (ck / "plan.json").stat().st_size,
                                   "sha256": hashlib.sha256((ck / "plan.json").read_bytes()).hexdigest()}
    (ck / "state.json").write_text(json.dumps(state))
    line = _export_refused(tmp_path / "r", tmp_path / "hf")
    assert "its plan.json is not a plan this llmqgen reads (" in line and "Field required" in line, line



def test_eval_on_an_empty_eval_split_fails_before_training(run, tmp_path):
    from llmqgen.data.shards import ShardError, read_manifest, write_manifest
    data = tiny_data(tmp_path / "noeval")
    m = read_manifest(data)
    m.eval, m.documents["eval"] = [], 0
    write_manifest(data, m)
    with pytest.raises(ShardError, match="--eval-every 2: .*the eval split has 0 tokens.*--eval-fraction"):
        train(run, data, tmp_path / "r", steps=3, warmup=1, eval_every=2)
    assert not (tmp_path / "r" / "log.jsonl").exists()
    train(run, data, tmp_path / "r2", steps=1, warmup=0)        # without evaluation: runs


# --- damaged checkpoints on resume (issue 14.10) ------------------------------------------------------

@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_resume_latest_passes_over_a_damaged_newest(run, data, tmp_path, damage, caplog):
    out = tmp_path / "r"
    train(run, data, out, steps=3, warmup=1, checkpoint_every=1)
    t = out / "checkpoints" / "step-000003" / "tensors.safetensors"
    if damage == "truncated":
        with open(t, "r+b") as f:
            f.truncate(t.stat().st_size // 2)
    else:
        t.unlink()
    with pytest.raises(CheckpointError, match="step-000003 is damaged.*newest intact checkpoint is step-000002"):
        train(run, data, out, resume="3")                # named explicitly: refused
    caplog.set_level(logging.INFO, logger="llmqgen")
    train(run, data, out, resume="latest")
    warn = logged(caplog, logging.WARNING)
    assert len(warn) == 1 and "step-000003 is damaged" in warn[0] and "using step-000002" in warn[0]
    assert any(x.startswith("resumed from step 2") for x in logged(caplog))
    assert read_checkpoint(out / "checkpoints", 3).step == 3          # step 3 done again, intact


# --- the run's settings on resume (issue 14.9) ---------------------------------------------------------

def test_resume_keeps_saved_settings_and_refuses_silent_changes(run, data, tmp_path):
    out = tmp_path / "r"
    train(run, data, out, steps=6, warmup=2, lr=1e-3, stop_after=3)
    full = tmp_path / "full"
    FakeTrainer.reset()
    train(run, data, full, steps=6, warmup=2, lr=1e-3)
    want = FakeTrainer.lrs[3:]
    with pytest.raises(ValueError, match=r"would change the saved run \(lr 0.001 -> 0.0002, warmup 2 -> 5\): "
                                         r"add --change lr,warmup"):
        train(run, data, out, resume="latest", lr=2e-4, warmup=5)
    with pytest.raises(ValueError, match="steps 6 -> 9.*--change steps"):
        train(run, data, out, resume="latest", steps=9)       # unfinished: would stretch the schedule
    FakeTrainer.reset()
    train(run, data, out, resume="latest")                   # nothing given: the saved run continues
    assert FakeTrainer.lrs == want
    assert [r["step"] for r in read_log(out / "log.jsonl")] == list(range(6))


def test_resume_with_an_explicit_change_applies_and_logs_it(run, data, tmp_path, caplog):
    out = tmp_path / "r"
    train(run, data, out, steps=6, warmup=1, lr=1e-3, schedule="constant", stop_after=3)
    FakeTrainer.reset()
    caplog.set_level(logging.INFO, logger="llmqgen")
    train(run, data, out, resume="latest", lr=5e-4, change=("lr",))
    assert "changing lr 0.001 -> 0.0005 from step 3 (--change lr)" in logged(caplog)
    assert [lr for _, lr in FakeTrainer.lrs] == [5e-4] * 3
    events = [r for r in read_log(out / "log.jsonl", events=True) if r.get("event", "device_memory") != "device_memory"]
    assert events == [{"event": "config_change", "step": 3, "changes": {"lr": [1e-3, 5e-4]}}]
    st = json.loads((out / "checkpoints" / "step-000006" / "state.json").read_text())
    assert st["run"]["lr"] == 5e-4                           # the next resume keeps the new value
    with pytest.raises(ValueError, match="--change seed"):
        train(run, data, out, resume="latest", change=("seed",))


def test_steps_extend_a_finished_run_at_its_final_lr(run, data, tmp_path, caplog):
    out = tmp_path / "r"
    train(run, data, out, steps=4, warmup=1, lr=1e-3)
    FakeTrainer.reset()
    caplog.set_level(logging.INFO, logger="llmqgen")
    train(run, data, out, resume="latest", steps=6)
    assert any(x.startswith("extending the finished run from 4 to 6 steps") for x in logged(caplog))
    assert [s for s, _ in FakeTrainer.lrs] == [4, 5]
    assert all(lr == pytest.approx(1e-4) for _, lr in FakeTrainer.lrs)     # final_fraction 0.1 of peak
    with pytest.raises(ValueError, match="at step 6; --steps 5 leaves nothing"):
        train(run, data, out, resume="latest", steps=5)
    FakeTrainer.reset()
    train(run, data, out, resume="latest", steps=10, change=("steps",))    # a new schedule over 10 steps
    assert FakeTrainer.lrs[0][1] > 1e-4


# --- non-finite steps (issue 14.13) --------------------------------------------------------------------

def test_nonfinite_steps_are_skipped_without_advancing(run, data, tmp_path):
    out = tmp_path / "r"
    FakeTrainer.reset()
    FakeTrainer.poison = {1, 2}              # attempts 1 and 2 (step index 1, twice) have a NaN norm
    train(run, data, out, steps=4, warmup=1, lr=1e-3)
    assert [s for s, _ in FakeTrainer.lrs] == [0, 1, 2, 3]      # the LR position did not move on skips
    recs = read_log(out / "log.jsonl")
    assert [(r["step"], r["skipped"]) for r in recs] == [(0, False), (1, True), (1, True), (1, False),
                                                         (2, False), (3, False)]
    assert len(FakeTrainer.batches) == 6                          # skipped steps consumed their batches


def test_too_many_nonfinite_steps_stop_with_a_checkpoint(run, data, tmp_path):
    out = tmp_path / "r"
    FakeTrainer.reset()
    FakeTrainer.poison = {2, 3, 4}
    with pytest.raises(run.TrainingStopped, match=r"step 3 was not finite 3 times in a row .*step-000002"):
        train(run, data, out, steps=6, warmup=1)
    ck = read_checkpoint(out / "checkpoints")
    assert ck.step == 2 and not (out / "model").exists()
    assert [r["event"] for r in read_log(out / "log.jsonl", events=True) if "event" in r] == \
        ["stopped_nonfinite", "device_memory"]
    FakeTrainer.poison = set()
    train(run, data, out, resume="latest")                        # resumes after the bad batches
    assert read_checkpoint(out / "checkpoints").step == 6


def test_max_bad_steps_is_configurable(run, data, tmp_path):
    FakeTrainer.reset()
    FakeTrainer.poison = {0}
    with pytest.raises(run.TrainingStopped, match="step 1 was not finite 1 times"):
        train(run, data, tmp_path / "r", steps=3, warmup=1, max_bad_steps=1)


def test_sigterm_checkpoints_like_ctrl_c(run, data, tmp_path, monkeypatch, caplog):
    real = FakeTrainer.accumulate

    def accumulate(self, batches):
        real(self, batches)
        if self.step_count == 1:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(FakeTrainer, "accumulate", accumulate)
    caplog.set_level(logging.INFO, logger="llmqgen")
    before = signal.getsignal(signal.SIGTERM)
    train(run, data, tmp_path / "r", steps=5, warmup=1)
    assert "stopped at step 2: saving" in logged(caplog)
    assert read_checkpoint(tmp_path / "r" / "checkpoints").step == 2 and (tmp_path / "r" / "model").is_dir()
    assert signal.getsignal(signal.SIGTERM) == before


# --- eval: forward only --------------------------------------------------------------------------------

def test_eval_uses_the_forward_only_path(run, data, tmp_path):
    FakeTrainer.reset()
    train(run, data, tmp_path / "r", steps=4, warmup=1, eval_every=2, eval_batches=2)
    assert len(FakeTrainer.evals) == 4 and len(FakeTrainer.batches) == 4     # eval fed no training step
    recs = read_log(tmp_path / "r" / "log.jsonl")
    assert [r["eval_loss"] is not None for r in recs] == [False, True, False, True]


# --- the dataset's vocabulary (issue 14.8) ------------------------------------------------------------

def test_dataset_vocab_larger_than_the_models_is_refused_before_the_trainer(run, tmp_path, monkeypatch):
    big = tiny_data(tmp_path / "big", tokens=5000, vocab=151_665, tokenizer="qwen2.5:abc")
    made = []
    monkeypatch.setattr(FakeTrainer, "__init__", lambda *a, **k: made.append(1))
    with pytest.raises(ValueError) as e:
        train(run, big, tmp_path / "r", steps=2)
    assert str(e.value) == ("the dataset was tokenised with qwen2.5 (vocab 151,665 ids); tiny-qwen2 has vocab 512: "
                            "prepare data with its tokenizer (llmqgen data prepare DOCS --out DIR --tokenizer PATH) "
                            "or pick a Qwen model")
    assert not made


def test_tiny_spec_is_the_helpers():
    assert tiny_plan().model == TINY


# --- the schedule's sections behind eval and the non-finite skip ---------------------------------------

@pytest.mark.parametrize("zero", [0, 3])
def test_schedule_eval_head_is_forward_only_and_gradnorm_comes_before_any_update(zero):
    from llmqgen.plan.schedule import build_schedule
    from llmqgen.hardware.inventory import parse_inventory
    from llmqgen.plan.solver import solve
    p = tiny_plan() if zero == 0 else solve(TINY, parse_inventory("2xH200", "256G"), seq_len=64,
                                            tokens_per_step=1024, pins={"sharding.weights": True})
    s = build_schedule(p)
    head = s["eval"]["head"]
    assert head and all(op["phase"] == "forward" for op in head)
    assert not [op for op in head if op["op"] == "linear" and op["pass"] != "forward"]
    refs = json.dumps(head)
    assert "grads." not in refs and "llmq_loss_reduce" in refs
    assert [op for op in s["micro_step"]["head"] if op["phase"] == "forward"] == head
    g = s["optimizer_step"]["gradnorm"]
    assert g[-1]["op"] == "gradnorm_finalize"
    kernels = [op.get("kernel", "") for sec in s["optimizer_step"].values() for op in sec]
    assert not any(k.startswith("llmq_adamw") for k in [op.get("kernel", "") for op in g])
    assert any(k.startswith("llmq_adamw") for k in kernels)
    assert not any(op["op"] in ("gradnorm_partials", "gradnorm_finalize")
                   for name, sec in s["optimizer_step"].items() if name != "gradnorm" for op in sec)


def test_cli_resume_keeps_saved_settings_unless_changed(run, data, tmp_path):
    plan = tmp_path / "p.json"
    plan.write_text(tiny_plan().to_json())
    base = ["run", "--plan", str(plan), "--data", str(data), "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, base + ["--steps", "4", "--warmup", "1", "--lr", "1e-3", "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output
    (tmp_path / "r" / "checkpoints" / "step-000004").rename(tmp_path / "r" / "checkpoints" / "step-000004.x")
    r = CliRunner().invoke(main, base + ["--resume", "latest", "--lr", "5e-4"])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == ("error: resuming step-000002 would change the saved run (lr 0.001 -> "
                                                  "0.0005): add --change lr to apply them from step 2, or leave "
                                                  "those options out")
    FakeTrainer.reset()
    r = CliRunner().invoke(main, base + ["--resume", "latest", "--lr", "5e-4", "--change", "lr"])
    assert r.exit_code == 0, r.output
    assert "changing lr 0.001 -> 0.0005 from step 2 (--change lr)" in r.output
    assert [s for s, _ in FakeTrainer.lrs] == [2, 3]       # the saved 4 steps, not the option's default 300


def test_cli_resume_reads_the_runs_own_dataset(run, data, tmp_path):
    """A resume without --data reads the dataset the run read (not the embedded corpus); another --data is
    refused, since the saved read position belongs to the run's own; a dataset that has moved is given anew."""
    import shutil
    plan = tmp_path / "p.json"
    plan.write_text(tiny_plan().to_json())
    own = tmp_path / "own"
    shutil.copytree(data, own)
    base = ["run", "--plan", str(plan), "--out", str(tmp_path / "r")]
    r = CliRunner().invoke(main, base + ["--data", str(own), "--steps", "4", "--warmup", "1", "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output

    def saved_data(step):
        state = json.loads((tmp_path / "r" / "checkpoints" / f"step-{step:06d}" / "state.json").read_text())
        return state["run"]["data"]
    FakeTrainer.reset()
    r = CliRunner().invoke(main, base + ["--resume", "latest", "--steps", "6", "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output
    assert saved_data(6) == str(own) and "default corpus" not in r.output
    other = tiny_data(tmp_path / "other")
    r = CliRunner().invoke(main, base + ["--resume", "latest", "--steps", "8", "--data", str(other)])
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.output.strip().splitlines()[-1] == (
        f"error: resuming step-000006 would change the dataset ({own} -> {other}): the saved read position "
        f"belongs to {own}; leave --data out, or start a new run (another --out)")
    moved = tmp_path / "moved"
    own.rename(moved)
    r = CliRunner().invoke(main, base + ["--resume", "latest", "--steps", "8"])
    assert r.exit_code == 2 and f"read {own}, which is not there any more: give --data with its new place" in r.output
    FakeTrainer.reset()
    r = CliRunner().invoke(main, base + ["--resume", "latest", "--steps", "8", "--data", str(moved),
                                         "--checkpoint-every", "2"])
    assert r.exit_code == 0, r.output
    assert saved_data(8) == str(moved)
