"""Step log: JSON lines on disk (append, flush, resume), readable lines and a progress bar on a TTY."""
import dataclasses
import io
import json
import math

import pytest

from llmqgen.runtime.log import StepLogger, StepRecord, format_duration, format_step, read_log


class Tty(io.StringIO):
    def isatty(self):
        return True


def rec(step=11, **kw):
    base = {"step": step, "loss": 3.45123, "grad_norm": 0.8412, "lr": 3e-4, "step_ms": 412.3,
            "tokens_per_s": 162_300.4, "sol_pct": 41.2, "mfu_pct": 38.4, "gpu_mem_bytes": int(61.2 * 2**30)}
    return StepRecord(**{**base, **kw})


def test_readable_line_matches_the_documented_format():
    assert format_step(rec(), 300) == ("step 12/300 | loss 3.4512 | norm 0.84 | lr 3.0e-04 | 412 ms | "
                                       "162,300 tok/s | SOL 41% | MFU 38% | 61.2 GiB")
    assert "| eval 3.2100 |" in format_step(rec(eval_loss=3.21), 300)


def test_jsonl_lines_are_written_flushed_and_read_back(tmp_path):
    path = tmp_path / "runs" / "x" / "log.jsonl"      # parent dirs are created
    out = io.StringIO()
    log = StepLogger(path, total_steps=3, stream=out)
    log.log(rec(step=0))
    # flushed per line: another reader sees the step before close()
    assert read_log(path) == [dataclasses.asdict(rec(step=0))]
    log.log(rec(step=1, eval_loss=2.5))
    log.close()
    got = read_log(path)
    assert [r["step"] for r in got] == [0, 1]
    assert got[1]["eval_loss"] == 2.5 and got[0]["eval_loss"] is None
    assert set(got[0]) == {f.name for f in dataclasses.fields(StepRecord)}
    assert out.getvalue().splitlines()[1].startswith("step 2/3 | loss 3.4512 | eval 2.5000")
    assert "ETA" not in out.getvalue()                 # not a TTY: plain lines


def test_resume_appends_and_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "log.jsonl"
    with StepLogger(path, total_steps=10, stream=io.StringIO()) as log:
        log.log(rec(step=0))
        log.log(rec(step=1))
    with path.open("a") as f:
        f.write('{"step": 2, "loss": 3.')               # the process died mid-write
    assert [r["step"] for r in read_log(path)] == [0, 1]
    with StepLogger(path, total_steps=10, stream=io.StringIO()) as log:
        log.log(rec(step=2))
    assert [r["step"] for r in read_log(path)] == [0, 1, 2]


def test_bad_line_in_the_middle_raises(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    with pytest.raises(ValueError, match="log.jsonl:2"):
        read_log(path)


def test_nan_loss_survives_the_round_trip(tmp_path):
    path = tmp_path / "log.jsonl"
    out = io.StringIO()
    with StepLogger(path, total_steps=5, stream=out) as log:
        log.log(rec(step=0, loss=float("nan")))
    assert math.isnan(read_log(path)[0]["loss"])
    assert "loss nan" in out.getvalue()


def test_tty_gets_progress_bar_and_eta_from_recent_step_times():
    out = Tty()
    log = StepLogger(None, total_steps=100, stream=out)  # no file
    log.log(rec(step=0, step_ms=1000.0))
    log.log(rec(step=1, step_ms=3000.0))
    lines = out.getvalue().splitlines()
    # 2 of 100 done, 98 left at the mean 2 s/step = 196 s
    assert lines[1].endswith("[" + "." * 20 + "] 2% ETA 3:16")
    log.log(rec(step=49, step_ms=2000.0))
    assert out.getvalue().splitlines()[2].endswith("[" + "#" * 10 + "." * 10 + "] 50% ETA 1:40")
    log.log(rec(step=99, step_ms=2000.0))
    assert out.getvalue().splitlines()[3].endswith("[" + "#" * 20 + "] 100% ETA 0:00")
    log.close()
    with pytest.raises(RuntimeError, match="after close"):
        log.log(rec())


def test_eta_follows_only_the_recent_window():
    out = Tty()
    log = StepLogger(None, total_steps=1000, stream=out)
    log.log(rec(step=0, step_ms=60_000.0))             # a slow first step (graph capture, warm-up)
    for i in range(1, 21):
        log.log(rec(step=i, step_ms=100.0))
    # 979 left at 100 ms: the first step has left the 20-step window
    assert out.getvalue().splitlines()[-1].endswith("ETA 1:38")


def test_durations():
    assert format_duration(0) == "0:00"
    assert format_duration(59.6) == "1:00"
    assert format_duration(3 * 3600 + 62) == "3:01:02"


def test_records_are_plain_json():
    line = json.dumps(dataclasses.asdict(rec(eval_loss=1.0)))
    assert json.loads(line)["gpu_mem_bytes"] == int(61.2 * 2**30)
    with pytest.raises(ValueError, match="total_steps"):
        StepLogger(None, total_steps=0)
