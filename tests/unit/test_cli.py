"""The CLI through click's runner: plan writes a file and prints the tables; errors are clear; the
library's log records printed plainly, once per job."""
import json
import logging

from click.testing import CliRunner

from llmqgen.cli import main, terminal_logging


def run(*args):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_plan_writes_and_shows(tmp_path):
    r = run("plan", "--model", "0.5b", "--gpus", "1xH200", "--host-mem", "64G", "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    path = tmp_path / "qwen2.5-0.5b-e4m3-1xh200.json"
    assert path.exists()
    assert "Device memory, per GPU" in r.output and "Runners-up" in r.output
    assert "  throughput " in r.output and " tok/s | SOL " in r.output      # metrics.Throughput.line()
    plan = json.loads(path.read_text())
    assert plan["schema"] == 1 and plan["inventory"]["host_mem_source"] == "user"
    shown = run("plan", "--show", str(path))
    assert shown.exit_code == 0 and "qwen2.5-0.5b" in shown.output
    as_json = run("plan", "--show", str(path), "--json")
    assert json.loads(as_json.output) == plan


def test_plan_pins_and_json(tmp_path):
    r = run("plan", "--model", "qwen3-0.6b", "--gpus", "1x4090", "--dtype", "bf16", "--set", "recompute.ffn=true",
            "--micro-batch", "4", "--seq-len", "2048", "--tokens-per-step", "65536", "--json",
            "--out", str(tmp_path))
    assert r.exit_code == 0, r.output
    p = json.loads(r.output)
    assert p["recompute"]["ffn"] and p["batch"]["micro_batch"] == 4 and p["precision"]["matmul"] == "bf16"
    assert p["inventory"]["host_mem_source"] == "assumed"


def test_plan_errors_are_clear(tmp_path):
    r = CliRunner().invoke(main, ["plan", "--model", "72b", "--gpus", "1x4060ti", "--host-mem", "32G",
                                  "--out", str(tmp_path)])
    assert r.exit_code == 2 and "does not fit" in r.output
    r = CliRunner().invoke(main, ["plan", "--gpus", "4x4909", "--out", str(tmp_path)])
    assert r.exit_code == 2 and "4090" in r.output
    r = CliRunner().invoke(main, ["plan", "--set", "recompute.ffn", "--out", str(tmp_path)])
    assert r.exit_code != 0 and "KEY=VALUE" in r.output


def test_catalog_commands():
    r = run("models")
    assert r.exit_code == 0 and "qwen2.5-32b" in r.output and "llama3.1-70b" in r.output
    r = run("gpus")
    assert r.exit_code == 0 and "4090" in r.output and "330" in r.output


def test_library_records_print_plainly_on_rank_zero_only(capsys, monkeypatch):
    """INFO on stdout as the bare message, warnings on stderr as "warning: ..."; DEBUG nowhere; on a
    launcher's other ranks errors only; the handler is gone after the block (and after a command)."""
    log = logging.getLogger("llmqgen.test")
    with terminal_logging():
        log.debug("hidden")
        log.info("header line")
        log.warning("checkpoint step-3 is damaged")
    out = capsys.readouterr()
    assert (out.out, out.err) == ("header line\n", "warning: checkpoint step-3 is damaged\n")
    for k, v in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                 "MASTER_ADDR": "127.0.0.1"}.items():
        monkeypatch.setenv(k, v)
    with terminal_logging():
        log.info("header line")
        log.warning("careful")
        log.error("broken")
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", "error: broken\n")
    handlers = list(logging.getLogger("llmqgen").handlers)
    assert run("models").exit_code == 0
    assert logging.getLogger("llmqgen").handlers == handlers


def test_build_model_saves_the_plan_it_solves_for_run(tmp_path, monkeypatch):
    """`build --model` solves a plan; it lands in the plans folder, where `run` and `bench` take the newest."""
    monkeypatch.setenv("LLMQGEN_PLANS_DIR", str(tmp_path / "plans"))
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "cache"))
    r = run("build", "--model", "0.5b", "--gpus", "1x4090", "--out", str(tmp_path / "build"))
    assert r.exit_code == 0, r.output
    saved = tmp_path / "plans" / "qwen2.5-0.5b-e4m3-1x4090.json"
    assert f"saved as {saved}" in r.output and json.loads(saved.read_text())["name"] == saved.stem
