"""Bad input through the CLI: one clear line (`error: ...` or click's usage error), a non-zero exit and
nothing written -- never a traceback."""
import json
import re
import sys
import types
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmqgen.cli import NO_DRIVER_RUNTIME, main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def refused(r, *needles):
    """The command stopped cleanly: exit 2 (ours or click's usage error), no traceback, the needles said."""
    assert r.exit_code == 2, (r.exit_code, r.output, r.exception)
    assert isinstance(r.exception, SystemExit), r.exception
    assert "Traceback" not in r.output
    for n in needles:
        assert n in r.output, r.output
    return r.output


def our_line(r, *needles) -> str:
    """One `error: ...` line."""
    out = refused(r, *needles)
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, out
    return errors[0]


@pytest.fixture
def plan_file(tmp_path):
    r = invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--host-mem", "64G", "--out", tmp_path, "--name", "ok")
    assert r.exit_code == 0, r.output
    return tmp_path / "ok.json"


# --- item 6: the FP8 row rule (field case fp8-dims-not-multiple-of-16) ----------------------------
def test_field_case_seq_len_1000(tmp_path):
    out = tmp_path / "plans"
    line = our_line(invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--seq-len", 1000, "--out", out),
                    "error: the default --tokens-per-step 524288 is not", "pick e.g. 524000")
    assert "multiples of 2" in line
    r = invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--seq-len", 1000, "--tokens-per-step", 524000,
               "--name", "s1000", "--out", out)
    assert r.exit_code == 0, r.output
    p = json.loads((out / "s1000.json").read_text())
    assert p["batch"]["micro_batch"] * 1000 % 16 == 0
    r = invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--seq-len", 1000, "--tokens-per-step", 524000,
               "--micro-batch", 4, "--name", "s1000mb4", "--out", out)
    assert r.exit_code == 0 and json.loads((out / "s1000mb4.json").read_text())["batch"]["micro_batch"] == 4
    our_line(invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--seq-len", 1000, "--tokens-per-step", 524000,
                    "--micro-batch", 1, "--name", "s1000mb1", "--out", out),
             "--micro-batch 1: 1000 token rows per micro-step must be a multiple of 16", "use --micro-batch 2, 4, 262 or 524")
    assert not (out / "s1000mb1.json").exists()


def test_attn_bwd_chunks_that_do_not_divide_the_micro_batch(tmp_path):
    """The hint names only the rule broken, and the micro-batch and tokens per step it suggests do plan."""
    line = our_line(invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--set", "attn_bwd_chunks=3",
                           "--micro-batch", 16, "--out", tmp_path), "divisible by attn_bwd_chunks=3")
    assert "FP8" not in line
    mb, tokens = re.search(r"use --micro-batch (\d+) with --tokens-per-step (\d+)", line).groups()
    r = invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--set", "attn_bwd_chunks=3", "--micro-batch", mb,
               "--tokens-per-step", tokens, "--out", tmp_path)
    assert r.exit_code == 0, r.output


def test_field_case_seq_len_1001(tmp_path):
    for mb in ([], ["--micro-batch", 16]):
        r = invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--seq-len", 1001, "--tokens-per-step", 512512,
                   *mb, "--json", "--out", tmp_path)
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["batch"]["micro_batch"] % 16 == 0


# --- item 10: numbers ------------------------------------------------------------------------------
@pytest.mark.parametrize("args,needle", [
    (["--seq-len", 0], "--seq-len"), (["--seq-len", -1], "--seq-len"), (["--micro-batch", 0], "--micro-batch"),
    (["--micro-batch", -4], "--micro-batch"), (["--tokens-per-step", 0], "--tokens-per-step"),
    (["--tokens-per-step", -524288], "--tokens-per-step"),
])
def test_plan_out_of_range_numbers(tmp_path, args, needle):
    refused(invoke("plan", *args, "--out", tmp_path), "Invalid value", needle)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args,needle", [
    (["--tokens-per-step", 100], "less than one sequence per GPU (seq_len 1024 x 1 GPU = 1024)"),
    (["--seq-len", 100000], "max_position_embeddings 32768"),
    (["--micro-batch", 3], "does not divide"),
])
def test_plan_numbers_that_do_not_fit_together(tmp_path, args, needle):
    line = our_line(invoke("plan", *args, "--out", tmp_path))
    assert needle in line or needle == "does not divide" and "--micro-batch 1, 2, 4" in line, line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("cmd", [["bench", "--steps", 0], ["bench", "--warmup", -1], ["run", "--steps", 0],
                                 ["run", "--seed", -1], ["train", "--seq-len", 0], ["run", "--eval-every", -5],
                                 ["run", "--lr", "nan"], ["run", "--lr", -1], ["train", "--lr", "inf"],
                                 ["run", "--weight-decay", -0.1], ["run", "--weight-decay", "nan"],
                                 ["run", "--max-bad-steps", 0], ["train", "--max-bad-steps", -2],
                                 ["run", "--keep-last", -1], ["train", "--keep-last", -3],
                                 ["run", "--checkpoint-minutes", -1], ["train", "--checkpoint-minutes", "nan"]])
def test_run_options_out_of_range(cmd):
    refused(invoke(*cmd), "Invalid value")


# --- item 10: plan files ---------------------------------------------------------------------------
def _bad_files(tmp_path, plan_file):
    good = plan_file.read_text()
    files = {
        "empty": ("", "is not an llmqgen plan (the file is empty)"),
        "truncated": (good[:300], "is not an llmqgen plan (not valid JSON"),
        "foreign": ('{"name": "x", "version": 3}', "is not an llmqgen plan (a JSON object with keys name, version"),
        "list": ("[1, 2]", "is not an llmqgen plan (a JSON list"),
        "newer": (good.replace('"schema": 1', '"schema": 7'), "written by a newer llmqgen (schema 7 > 1): upgrade"),
        "older": (good.replace('"schema": 1', '"schema": 0'), "written by an older llmqgen (schema 0 < 1)"),
        "invalid": (good.replace('"micro_batch": ', '"micro_batch": -'), "is not a valid llmqgen plan (batch.micro_batch"),
        # a hand-edited flag: true or false only (as `--set` checks), not pydantic's lax "yes" or 1
        "lax flag": (good.replace('"fast_accum": false', '"fast_accum": "yes"'),
                     "is not a valid llmqgen plan (precision.fast_accum: Input should be a valid boolean"),
        "number flag": (good.replace('"cuda_graphs": true', '"cuda_graphs": 1'),
                        "is not a valid llmqgen plan (cuda_graphs: Input should be a valid boolean"),
        "flag count": (good.replace('"lm_head_chunks": 1', '"lm_head_chunks": true'),
                       "is not a valid llmqgen plan (lm_head_chunks: Input should be a valid integer"),
    }
    for name, (text, needle) in files.items():
        (tmp_path / f"{name}.json").write_text(text)
    (tmp_path / "binary.json").write_bytes(b"\x7fELF\x02\x01\x01\x00\xff\xfe")
    files["binary"] = (None, "is not an llmqgen plan (not a text file)")
    return {tmp_path / f"{k}.json": needle for k, (_, needle) in files.items()}


def test_a_plan_file_edited_out_of_step_with_its_estimate(no_driver_runtime, tmp_path, plan_file):
    """Edits the memory rows do not show (a fresh user's trial): the step's shape (grad_accum) is caught by
    the step time, an inventory below what the plan needs by its memory, for every command; zero memory is
    no inventory at all; a name with directories is no plan name (it names the run's folder)."""
    d = json.loads(plan_file.read_text())

    def edited(name, change):
        e = json.loads(json.dumps(d))
        change(e)
        (tmp_path / f"{name}.json").write_text(json.dumps(e))
        return tmp_path / f"{name}.json"
    ga = edited("ga", lambda e: e["batch"].update(grad_accum=3))
    our_line(invoke("plan", "--show", ga), "its estimate does not match its inputs")
    small = edited("small", lambda e: e["inventory"]["gpu"].update(memory_bytes=8 * 2**30))
    for cmd in (["plan", "--show", small], ["build", "--plan", small, "--out", tmp_path / "b"], ["bench", "--plan", small]):
        our_line(invoke(*cmd), "the plan needs", "GiB per GPU, its inventory (1xh200) has 7.8 GiB usable")
    assert not (tmp_path / "b").exists()
    our_line(invoke("plan", "--show", edited("nohost", lambda e: e["inventory"].update(host_mem_bytes=0))),
             "of pinned host RAM, its inventory (1xh200) has 0 B usable")
    our_line(invoke("plan", "--show", edited("zero", lambda e: e["inventory"]["gpu"].update(memory_bytes=0))),
             "is not a valid llmqgen plan (inventory.gpu.memory_bytes")
    our_line(invoke("plan", "--show", edited("dirs", lambda e: e.update(name="../../etc/x"))),
             "plan name '../../etc/x' must be a plain file name")
    # the cost model divides by the GPU's rates; ZeRO-1/2 on one GPU is no plan the planner makes
    for field, value, said in (("bf16_tflops", 0, "should be greater than 0"), ("pcie_gen", 7, "should be 3, 4 or 5"),
                               ("mem_bandwidth_gbs", -1, "should be greater than 0")):
        our_line(invoke("plan", "--show", edited(field, lambda e: e["inventory"]["gpu"].update({field: value}))),
                 f"inventory.gpu.{field}: Input {said}")
    our_line(invoke("build", "--plan", edited("zero2", lambda e: e["sharding"].update(gradients=True)),
                    "--out", tmp_path / "b"), "ZeRO-1 and ZeRO-2 have nothing to shard over there")


def test_plan_show_of_what_is_not_a_plan(tmp_path, plan_file):
    (tmp_path / "bad").mkdir()
    for path, needle in _bad_files(tmp_path / "bad", plan_file).items():
        for extra in ([], ["--json"]):
            line = our_line(invoke("plan", "--show", path, *extra), needle)
            assert line.startswith(f"error: {path}")


def test_build_and_run_of_what_is_not_a_plan(no_driver_runtime, tmp_path, plan_file):
    (tmp_path / "bad").mkdir()
    for path, needle in _bad_files(tmp_path / "bad", plan_file).items():
        our_line(invoke("build", "--plan", path, "--out", tmp_path / "build"), needle)
        assert not (tmp_path / "build").exists()
        our_line(invoke("bench", "--plan", path), needle)   # the runtime's import fails later, or its extra is missing


def test_plan_show_without_estimate(tmp_path, plan_file):
    d = json.loads(plan_file.read_text())
    d["estimate"] = None
    (tmp_path / "noest.json").write_text(json.dumps(d))
    our_line(invoke("plan", "--show", tmp_path / "noest.json"), "has no estimate")


def test_newest_plan_in_plans_dir_that_is_not_a_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMQGEN_PLANS_DIR", raising=False)
    (tmp_path / "llmqgen-plans").mkdir()
    (tmp_path / "llmqgen-plans" / "x.json").write_text("{")
    our_line(invoke("build"), "llmqgen-plans/x.json is not an llmqgen plan")


def test_no_plan_in_the_plans_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMQGEN_PLANS_DIR", str(tmp_path / "mine"))
    our_line(invoke("build"), f"none in {tmp_path / 'mine'}/", "--plan FILE")


def test_conflicting_pins_are_one_line(tmp_path):
    our_line(invoke("plan", "--set", "recompute.block=true", "--set", "recompute.ffn=false", "--out", tmp_path),
             "recompute.block=true and --set recompute.ffn=false conflict")
    assert not list(tmp_path.glob("*.json"))


# --- item 10: names, outputs -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["a/b", "../x", ".hidden", "a\\b", " x"])
def test_plan_name_must_be_a_file_name(tmp_path, name):
    our_line(invoke("plan", "--name", name, "--out", tmp_path / "plans"), "must be a plain file name")
    assert not (tmp_path / "plans").exists() or not list((tmp_path / "plans").rglob("*.json"))


def test_plan_out_that_is_a_file(tmp_path):
    (tmp_path / "f").write_text("")
    refused(invoke("plan", "--out", tmp_path / "f"), "is a file")                    # click says so
    our_line(invoke("plan", "--out", tmp_path / "f" / "plans"), "cannot write the plan")


def test_build_bad_arch(plan_file, tmp_path):
    our_line(invoke("build", "--plan", plan_file, "--arch", "sm_xx", "--out", tmp_path / "b"), "sm_<major><minor>")
    # a target NVRTC cannot compile for leaves no half-made build folder behind
    our_line(invoke("build", "--plan", plan_file, "--arch", "sm_999", "--out", tmp_path / "b"), "cannot target sm_999")
    assert not (tmp_path / "b").exists()


def test_plans_dir_that_is_a_file_is_named(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("LLMQGEN_PLANS_DIR", str(tmp_path / "f"))
    our_line(invoke("plan", "--model", "0.5b", "--gpus", "1xH200"), "set $LLMQGEN_PLANS_DIR to a writable folder")


def test_a_pinned_grad_accum_that_misses_the_step_says_what_to_use(tmp_path):
    our_line(invoke("plan", "--model", "0.5b", "--gpus", "1xH200", "--micro-batch", 16, "--set", "batch.grad_accum=4",
                    "--out", tmp_path), "the default --tokens-per-step 524288 is not micro_batch x grad_accum x "
             "seq_len x GPUs = 65536: use --tokens-per-step 65536, or --set batch.grad_accum=32")


# --- item 10: the GPU runtime without a driver -----------------------------------------------------
class DynamicLibNotFoundError(RuntimeError):
    """What cuda.pathfinder raises (cuda-bindings' and nvmath's first call) when libcuda is missing."""


NO_LIBCUDA = DynamicLibNotFoundError('"cuda" is an NVIDIA driver library and can only be found via system '
                                     'search. Ensure the NVIDIA display driver is installed.')


class _Runtime(types.ModuleType):
    """A stand-in runtime module: what a test does not set is a no-op (checks that pass)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return lambda *a, **k: None


@pytest.fixture
def no_driver_runtime(monkeypatch):
    """The `gpu` extra installed on a machine without a driver: the runtime imports, its first call fails."""
    def fail(*a, **k):
        raise NO_LIBCUDA
    bench = _Runtime("llmqgen.runtime.bench")
    bench.run_bench = fail
    run = _Runtime("llmqgen.runtime.run")
    run.RunConfig = lambda **kw: types.SimpleNamespace(**kw)
    run.train = fail
    monkeypatch.setitem(sys.modules, "llmqgen.runtime.bench", bench)
    monkeypatch.setitem(sys.modules, "llmqgen.runtime.run", run)


def test_bench_run_train_without_a_driver(no_driver_runtime, plan_file, tmp_path, monkeypatch, data):
    assert our_line(invoke("bench", "--plan", plan_file, "--out", tmp_path / "bench")) == f"error: {NO_DRIVER_RUNTIME}"
    assert our_line(invoke("run", "--plan", plan_file, "--data", data, "--out", tmp_path / "run")) \
        == f"error: {NO_DRIVER_RUNTIME}"
    monkeypatch.chdir(tmp_path)                 # train writes llmqgen-plans/<name>.json
    monkeypatch.delenv("LLMQGEN_PLANS_DIR", raising=False)
    assert our_line(invoke("train", "--gpus", "1xh200", "--data", data, "--steps", 1)) == f"error: {NO_DRIVER_RUNTIME}"


def test_a_resume_without_a_checkpoint_is_said_before_the_driver(no_driver_runtime, plan_file, tmp_path, data):
    for which in ("latest", "5"):
        line = our_line(invoke("run", "--plan", plan_file, "--data", data, "--out", tmp_path / "run", "--resume", which))
        assert "no checkpoint" in line and NO_DRIVER_RUNTIME not in line, line


def test_a_folder_that_holds_a_run_is_said_before_the_driver(no_driver_runtime, plan_file, tmp_path, monkeypatch,
                                                             data):
    """run/train into runs/<plan name> (or --out) holding a run, without --resume: one line, before the GPU is
    needed; train saves no plan then."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMQGEN_PLANS_DIR", raising=False)
    (tmp_path / "runs" / "ok" / "checkpoints" / "step-000005").mkdir(parents=True)
    assert our_line(invoke("run", "--plan", plan_file, "--data", data)) == (
        "error: runs/ok already holds a run (checkpoints up to step 5): add --resume to continue it, or --out "
        "<folder> for a new run")
    assert our_line(invoke("run", "--plan", plan_file, "--data", data, "--resume", "latest")) \
        == "error: runs/ok/checkpoints: every checkpoint is damaged (step-000005: state.json is missing): start " \
        "the run again in another --out"
    assert our_line(invoke("run", "--plan", plan_file, "--data", data, "--out", "runs/new")) \
        == f"error: {NO_DRIVER_RUNTIME}"
    assert our_line(invoke("train", "--gpus", "1xh200", "--data", data, "--steps", 1)) == f"error: {NO_DRIVER_RUNTIME}"
    (saved,) = (tmp_path / "llmqgen-plans").glob("*.json")
    saved.unlink()
    (tmp_path / "runs" / saved.stem).mkdir()
    (tmp_path / "runs" / saved.stem / "log.jsonl").write_text("")
    assert "already holds a run (its log.jsonl" in our_line(invoke("train", "--gpus", "1xh200", "--data", data))
    assert not list((tmp_path / "llmqgen-plans").iterdir())


def test_train_takes_host_mem(no_driver_runtime, tmp_path, monkeypatch, data):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMQGEN_PLANS_DIR", raising=False)
    r = invoke("train", "--gpus", "1x4090", "--host-mem", "256G", "--data", data, "--steps", 1)
    assert our_line(r) == f"error: {NO_DRIVER_RUNTIME}"
    (plan,) = (tmp_path / "llmqgen-plans").glob("*.json")
    assert json.loads(plan.read_text())["inventory"]["host_mem_bytes"] == 256 << 30
    assert our_line(invoke("train", "--gpus", "1x4090", "--host-mem", "12Q", "--data", data)).startswith(
        "error: --host-mem 12Q: size '12Q' not understood")


def test_resume_only_options_without_resume_and_init_from_with_it(no_driver_runtime, plan_file, tmp_path, data):
    base = ["run", "--plan", plan_file, "--data", data, "--out", tmp_path / "run"]
    assert "changes a resumed run's saved settings: add --resume" in our_line(invoke(*base, "--change", "lr"))
    hf = tmp_path / "hf"
    hf.mkdir()
    assert "--init-from and --resume conflict" in our_line(invoke(*base, "--resume", "latest", "--init-from", hf))


def test_missing_cuda_library_is_one_line(monkeypatch, plan_file):
    def fail(*a, **k):
        raise DynamicLibNotFoundError("Failure finding libcublasLt.so")
    bench = _Runtime("llmqgen.runtime.bench")
    bench.run_bench = fail
    monkeypatch.setitem(sys.modules, "llmqgen.runtime.bench", bench)
    our_line(invoke("bench", "--plan", plan_file), "libcublasLt", "pip install 'llmqgen[gpu]'")


@pytest.mark.parametrize("args,needle", [
    (("plan", "--show", "nonexist.json"), "'nonexist.json' does not exist"),
    (("plan", "--micro-batch", 0), "0 is not in the range x>=1"),
    (("plan", "--bogus"), "No such option '--bogus'"),
    (("nothing",), "No such command 'nothing'")])
def test_clicks_own_refusals_are_one_line_too(args, needle):
    line = our_line(invoke(*args), needle, "--help`)")
    assert line.startswith("error: ") and "Usage:" not in invoke(*args).output


def test_no_driver_is_said_before_the_missing_gpu_extra(monkeypatch, plan_file, tmp_path):
    """On a machine without a GPU, installing the extra would not help: the driver is named first."""
    monkeypatch.setattr("llmqgen.cli._driver_present", lambda: False)
    monkeypatch.setitem(sys.modules, "llmqgen.runtime.bench", None)      # import fails: no GPU extra
    assert our_line(invoke("bench", "--plan", plan_file, "--out", tmp_path)) == f"error: {NO_DRIVER_RUNTIME}"
    monkeypatch.setattr("llmqgen.cli._driver_present", lambda: True)
    our_line(invoke("bench", "--plan", plan_file, "--out", tmp_path), "pip install 'llmqgen[gpu]'")


def test_bench_devices_must_be_indices(no_driver_runtime, plan_file):
    our_line(invoke("bench", "--plan", plan_file, "--devices", "a,b"), "--devices 'a,b'")
    our_line(invoke("bench", "--plan", plan_file, "--devices", "-1"), "count from 0")


# --- item 11: --set, --host-mem, gpus --detect -------------------------------------------------------
def test_set_unknown_key_lists_the_valid_ones(tmp_path):
    line = our_line(invoke("plan", "--set", "nonexistent.key=1", "--out", tmp_path))
    assert "'nonexistent.key' is not a plan input" in line
    assert "recompute.{swiglu,norm,ffn,qkv,attention,block}" in line and "lm_head_chunks" in line
    assert "pydantic" not in line and "http" not in line
    assert "did you mean offload.residual" in our_line(invoke("plan", "--set", "offload.residul=true", "--out", tmp_path))


@pytest.mark.parametrize("item,needle", [
    ("recompute.ffn=maybe", "recompute.ffn takes true or false"),
    ("recompute.ffn=2", "--set recompute.ffn=2: recompute.ffn takes true or false"),
    ("lm_head_chunks=yes", "--set lm_head_chunks=yes: lm_head_chunks takes an integer >= 1"),   # as typed
    ("precision.amax_history=On", "--set precision.amax_history=On: precision.amax_history takes"),
    ("precision.matmul=fp16", "precision.matmul takes one of e4m3, bf16"),
    ("collectives=mpi", "collectives takes one of copy_engine, nccl"),
    ("lm_head_chunks=0", "lm_head_chunks takes an integer >= 1"),
    ("lm_head_chunks=two", "lm_head_chunks takes an integer >= 1"),
    ("precision.gradient=bf16", "FP8 matmuls need FP8 activation gradients"),
])
def test_set_bad_values(tmp_path, item, needle):
    line = our_line(invoke("plan", "--set", item, "--out", tmp_path), needle)
    assert "pydantic" not in line and "http" not in line
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["64", "4096", "100B", "64x"])
def test_host_mem_needs_a_unit(tmp_path, value):
    our_line(invoke("plan", "--host-mem", value, "--out", tmp_path), f"--host-mem {value}")
    assert not list(tmp_path.iterdir())


def test_gpus_detect_without_a_driver_names_a_real_option(monkeypatch):
    from llmqgen.hardware import host

    def no_nvml():
        raise host.NoDriverError(host.NO_DRIVER)
    monkeypatch.setattr(host, "detected_gpus", no_nvml)
    line = our_line(invoke("gpus", "--detect"), "no NVIDIA driver found")
    assert "llmqgen plan --gpus" in line and "name the GPUs, e.g. --gpus" not in line


def test_train_and_bench_without_a_driver_ask_for_one_not_for_a_name(monkeypatch, tmp_path, data):
    """Left to detect the GPUs, train and bench say that this machine has none to run on; naming one would
    only move the same error later (a fresh user's report)."""
    from llmqgen.hardware import host

    def no_nvml():
        raise host.NoDriverError(host.NO_DRIVER)
    monkeypatch.setattr(host, "detected_gpus", no_nvml)
    monkeypatch.setenv("LLMQGEN_PLANS_DIR", str(tmp_path / "plans"))
    for args in (("train", "--model", "0.5b", "--data", data), ("bench", "--model", "0.5b")):
        assert our_line(invoke(*args)) == f"error: {NO_DRIVER_RUNTIME}", args
    assert "name the GPUs" in our_line(invoke("plan", "--model", "0.5b", "--gpus", "auto", "--out", tmp_path / "p"))
    assert not (tmp_path / "plans").exists()


def test_gpus_detect_lists_mixed_models(monkeypatch):
    from llmqgen.hardware import host
    found = [host.DetectedGpu("NVIDIA GeForce RTX 4090", 24 * 2**30, "GPU-a"),
             host.DetectedGpu("NVIDIA GeForce RTX 3090", 24 * 2**30, "GPU-b"),
             host.DetectedGpu("NVIDIA GeForce RTX 4090", 24 * 2**30, "GPU-c")]
    monkeypatch.setattr(host, "detected_gpus", lambda: found)
    r = invoke("gpus", "--detect")
    assert r.exit_code == 0, r.output
    assert "detected: 2 x NVIDIA GeForce RTX 4090" in r.output and "--gpus 2x4090" in r.output
    assert "detected: 1 x NVIDIA GeForce RTX 3090" in r.output and "CUDA_VISIBLE_DEVICES" in r.output


# --- a new user's reports ----------------------------------------------------------------------------
def test_plan_file_and_planning_options_conflict(no_driver_runtime, plan_file, tmp_path):
    our_line(invoke("build", "--plan", plan_file, "--model", "7b", "--out", tmp_path / "b"), "--plan and --model conflict")
    assert not (tmp_path / "b").exists()
    our_line(invoke("bench", "--plan", plan_file, "--gpus", "1x4090"), "--plan and --gpus conflict")
    our_line(invoke("plan", "--show", plan_file, "--model", "7b", "--set", "recompute.ffn=true"),
             "--show and --model, --set conflict")


def test_run_without_a_plan_names_only_its_own_options(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LLMQGEN_PLANS_DIR", raising=False)
    assert "or --model/--gpus" not in our_line(invoke("run"), "--plan FILE")
    assert "--model/--gpus" in our_line(invoke("build"), "--plan FILE")


@pytest.mark.parametrize("args,needle", [
    (["--set", "batch.micro_batch=8", "--micro-batch", 16], "--micro-batch 16 and --set batch.micro_batch=8 disagree"),
    (["--set", "batch.seq_len=2048", "--seq-len", 512], "--seq-len 512 and --set batch.seq_len=2048 disagree"),
    (["--set", "recompute.ffn=true", "--set", "recompute.ffn=false"], "--set recompute.ffn=false and --set recompute.ffn=true disagree"),
    (["--dtype", "e4m3", "--set", "precision.matmul=bf16"], "--dtype e4m3 and --set precision.matmul=bf16 disagree"),
])
def test_an_input_given_twice_must_agree(tmp_path, args, needle):
    our_line(invoke("plan", *args, "--out", tmp_path), needle, "give one of them")
    assert not list(tmp_path.iterdir())
    agree = [a if a not in (16, 512) else {16: 8, 512: 2048}[a] for a in args]   # the same value twice: fine
    if "recompute.ffn=false" not in agree and "--dtype" not in agree:
        assert invoke("plan", *agree, "--out", tmp_path).exit_code == 0


def test_fp8_gradients_need_fp8_matmuls(tmp_path):
    line = our_line(invoke("plan", "--dtype", "bf16", "--set", "precision.gradient=e5m2", "--out", tmp_path),
                    "FP8 activation gradients (e5m2) need FP8 (e4m3) matmuls")
    assert "does not fit" not in line


def test_cache_folder_that_is_a_file_is_named_before_out(plan_file, tmp_path, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "cachefile"))
    line = our_line(invoke("build", "--plan", plan_file, "--out", tmp_path / "b"), "is a file: set LLMQGEN_CACHE_DIR")
    assert "--out" not in line
    assert our_line(invoke("cache")) == line


def test_cache_folder_that_cannot_be_made_is_named_not_out(plan_file, tmp_path, monkeypatch):
    (tmp_path / "cachefile").write_text("x")
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "cachefile" / "sub"))   # under a file: no mkdir
    line = our_line(invoke("build", "--plan", plan_file, "--out", tmp_path / "b"), "cannot write the cache under")
    assert "set LLMQGEN_CACHE_DIR to a writable folder" in line and "--out" not in line


def test_host_mem_shortfall_and_example(tmp_path):
    line = refused(invoke("plan", "--host-mem", "1K", "--out", tmp_path))
    assert "short 0.0 GiB" not in line and re.search(r"short [\d.]+ KiB", line), line
    our_line(invoke("plan", "--host-mem", "0", "--out", tmp_path), "e.g. 128G")


@pytest.mark.parametrize("value", [-5, 0])
def test_data_prepare_max_tokens_must_be_positive(tmp_path, value):
    (tmp_path / "a.txt").write_text("hello world\n")
    our_line(invoke("data", "prepare", tmp_path / "a.txt", "--out", tmp_path / "ds", "--max-tokens", value),
             f"--max-tokens must be positive, got {value}")


def test_pins_equal_to_the_default_leave_the_name(tmp_path):
    r = invoke("plan", "--dtype", "bf16", "--set", "precision.gradient=bf16", "--out", tmp_path, "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["name"] == "qwen2.5-0.5b-bf16-1xh200"


def test_edited_plan_file_is_not_shown_with_its_old_estimate(plan_file, tmp_path):
    d = json.loads(plan_file.read_text())
    d["model"]["num_layers"] = 2
    (tmp_path / "edited.json").write_text(json.dumps(d))
    our_line(invoke("plan", "--show", tmp_path / "edited.json"), "its estimate does not match its inputs",
             "re-plan with `llmqgen plan`")
    assert invoke("plan", "--show", plan_file).exit_code == 0


def test_nits(plan_file, tmp_path):
    (tmp_path / "cut.json").write_text(plan_file.read_text()[:2000])
    assert " at at " not in our_line(invoke("plan", "--show", tmp_path / "cut.json"), "not valid JSON")
    our_line(invoke("plan", "--gpus", "1xh200,1x4090", "--out", tmp_path), "mixed GPU kinds are not supported")
    line = our_line(invoke("plan", "--gpus", "1xh100sx", "--out", tmp_path))
    offered, known = line.split("did you mean ")[1].split("? Known GPUs: ")
    assert set(offered.split(", ")) <= set(known.split(", ")), line
    assert "--name x-evil" in our_line(invoke("plan", "--name", "../../x/evil", "--out", tmp_path))


# --- a second new user's reports -----------------------------------------------------------------------
@pytest.mark.parametrize("text,needle", [
    (b"one line\n", "line 1: expected '<base64 token> <rank>'"), (b"", "no tokens in it"),
    (b"YQ== 0\nabc 1\n", "line 2: expected"), (b"\x7fELF\x02 \x01 \x00\n", "line 1: expected")])
def test_data_prepare_tokenizer_that_is_not_a_bpe_file(tmp_path, text, needle):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "tok").write_bytes(text)
    our_line(invoke("data", "prepare", tmp_path / "a.txt", "--out", tmp_path / "ds", "--tokenizer", tmp_path / "tok"),
             f"error: {tmp_path / 'tok'} is not a tiktoken BPE file", needle)
    assert not (tmp_path / "ds").exists()


def test_data_prepare_tokenizer_folder_without_tokenizer_json(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "empty").mkdir()
    our_line(invoke("data", "prepare", tmp_path / "a.txt", "--out", tmp_path / "ds", "--tokenizer", tmp_path / "empty"),
             f"no tokenizer.json in {tmp_path / 'empty'}")


def test_data_prepare_out_that_cannot_be_written(tmp_path):
    """As export says it (a folder under a file fails as an unwritable folder does, and also as root)."""
    (tmp_path / "a.txt").write_text("hello world\n")
    (tmp_path / "f").write_text("")
    our_line(invoke("data", "prepare", tmp_path / "a.txt", "--out", tmp_path / "f" / "ds", "--quiet"),
             f"error: cannot write {tmp_path / 'f' / 'ds'}: Not a directory")


def test_hf_config_json_unreadable_or_a_folder(tmp_path, monkeypatch):
    (tmp_path / "dir" / "config.json").mkdir(parents=True)
    our_line(invoke("plan", "--model", tmp_path / "dir", "--out", tmp_path / "p"),
             f"{tmp_path / 'dir' / 'config.json'} is a folder, not a file")
    (tmp_path / "unread").mkdir()
    (tmp_path / "unread" / "config.json").write_text("{}")
    real = Path.read_text

    def read_text(self, *a, **k):      # chmod 000 does not stop root
        if self.name == "config.json":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *a, **k)
    monkeypatch.setattr(Path, "read_text", read_text)
    our_line(invoke("plan", "--model", tmp_path / "unread", "--out", tmp_path / "p"),
             f"error: cannot read {tmp_path / 'unread' / 'config.json'}: Permission denied")


def test_inputs_are_checked_before_the_driver(monkeypatch, tmp_path):
    """Without a GPU (no runtime, no driver) each command still names what is wrong with its inputs."""
    monkeypatch.setattr("llmqgen.cli._driver_present", lambda: False)
    monkeypatch.setitem(sys.modules, "llmqgen.runtime.bench", None)
    monkeypatch.setitem(sys.modules, "llmqgen.runtime.run", None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notplan.json").write_text("{")
    (tmp_path / "docs").mkdir()
    for args, needle in [(["bench", "--plan", "notplan.json"], "is not an llmqgen plan"),
                         (["bench", "--model", "nosuch"], "unknown model 'nosuch'"),
                         (["bench", "--model", "0.5b", "--gpus", "1xh200", "--devices", "x"], "--devices 'x'"),
                         (["train", "--gpus", "3xfoo"], "unknown GPU 'foo'"),
                         (["train", "--gpus", "1xh200", "--data", "docs"], "docs: no manifest.json"),
                         (["run", "--plan", "notplan.json"], "is not an llmqgen plan")]:
        our_line(invoke(*args), needle)
