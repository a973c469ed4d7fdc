"""What `llmqgen run`/`train` and `llmqgen export` may write over: a new run does not start in a folder that
holds a run; an export does not delete another writer's files; checkpoints are kept as --keep-last says and
written along a long run (--checkpoint-minutes). The real training loop runs on CPU with the stand-in
Trainer (tests/fake_trainer.py)."""
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_trainer import FakeTrainer, tiny_plan  # noqa: E402

from llmqgen.cli import main  # noqa: E402
from llmqgen.runtime.log import read_log  # noqa: E402


def train(run, data, out, **kw):
    return run.train(tiny_plan(), run.RunConfig(data=data, out=out, **kw))


def snapshot(folder: Path) -> dict:
    """Every file under `folder`: its bytes and modification time."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line(res) -> str:
    """The command refused: exit 2, one `error:` line, no traceback."""
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


@pytest.fixture
def plan_file(tmp_path):
    path = tmp_path / "p.json"
    path.write_text(tiny_plan().to_json())
    return path


# --- a new run in a folder that holds one ------------------------------------------------------------

def test_a_new_run_refuses_a_folder_that_holds_a_run(run, data, tmp_path, monkeypatch):
    out = tmp_path / "r"
    train(run, data, out, steps=3, warmup=1, checkpoint_every=1)
    before = snapshot(out)
    made = []
    monkeypatch.setattr(FakeTrainer, "__init__", lambda *a, **k: made.append(1))
    with pytest.raises(ValueError) as e:
        train(run, data, out, steps=3, warmup=1)
    assert str(e.value) == (f"{out} already holds a run (checkpoints up to step 3): add --resume to continue it, "
                            f"or --out <folder> for a new run")
    assert snapshot(out) == before and not made


@pytest.mark.parametrize("held", ["log", "model", "damaged checkpoint"])
def test_a_run_without_a_checkpoint_to_resume_is_refused_too(run, data, tmp_path, held):
    out = tmp_path / "r"
    if held == "log":
        out.mkdir()
        (out / "log.jsonl").write_text("{}\n")
        said = "its log.jsonl, no checkpoint to resume from"
    elif held == "model":
        (out / "model").mkdir(parents=True)
        (out / "model" / "config.json").write_text("{}")
        said = "an exported model in model/, no checkpoint to resume from"
    else:
        (out / "checkpoints" / "step-000007").mkdir(parents=True)     # its files gone: still a run's
        said = "checkpoints up to step 7"
    before = snapshot(out)
    with pytest.raises(ValueError, match=f"{out} already holds a run \\({said}\\)"):
        train(run, data, out, steps=2)
    assert snapshot(out) == before


def test_an_empty_folder_is_a_new_run(run, data, tmp_path):
    out = tmp_path / "r"
    (out / "model").mkdir(parents=True)
    (out / "checkpoints").mkdir()
    train(run, data, out, steps=2, warmup=1)
    assert [r["step"] for r in read_log(out / "log.jsonl")] == [0, 1]


def test_cli_a_second_run_in_the_same_folder_changes_nothing(run, data, tmp_path, plan_file):
    base = ["run", "--plan", str(plan_file), "--data", str(data), "--out", str(tmp_path / "r"), "--warmup", "1"]
    res = CliRunner().invoke(main, base + ["--steps", "2", "--checkpoint-every", "1"])
    assert res.exit_code == 0, res.output
    before = snapshot(tmp_path / "r")
    assert one_line(CliRunner().invoke(main, base + ["--steps", "2"])) == (
        f"error: {tmp_path / 'r'} already holds a run (checkpoints up to step 2): add --resume to continue it, "
        f"or --out <folder> for a new run")
    assert snapshot(tmp_path / "r") == before
    res = CliRunner().invoke(main, base + ["--steps", "4", "--resume", "latest"])      # --resume continues it
    assert res.exit_code == 0, res.output
    assert [r["step"] for r in read_log(tmp_path / "r" / "log.jsonl")] == [0, 1, 2, 3]
