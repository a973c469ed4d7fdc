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


def ok(res) -> bool:
    """The command succeeded."""
    assert res.exit_code == 0, res.output
    return True


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


# --- export: into a new folder, an empty one or an earlier export's ------------------------------------

def export(*args):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def other_model(folder: Path) -> None:
    """Another model's download: three shards, their index, config.json and a README."""
    import numpy as np
    from llmqgen.checkpoint.safetensors import write_sharded
    write_sharded(folder, {f"w{i}": np.full(100, i, np.float32) for i in range(3)}, shard_bytes=400)
    (folder / "config.json").write_text('{"model_type": "other"}')
    (folder / "README.md").write_text("another model")


def test_export_refuses_a_folder_with_files_it_did_not_write(run, data, tmp_path):
    train(run, data, tmp_path / "r", steps=1, warmup=0)
    hf = tmp_path / "hf"
    other_model(hf)
    before = snapshot(hf)
    assert one_line(export(tmp_path / "r", hf)) == (
        f"error: {hf} holds files that no llmqgen export wrote (README.md, config.json, "
        f"model-00001-of-00003.safetensors and 3 more): export into a new or empty folder, or add --force to "
        f"write there anyway (its model safetensors files and config.json are replaced, other files kept)")
    assert snapshot(hf) == before
    res = export(tmp_path / "r", hf, "--force")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in hf.iterdir()) == ["README.md", "config.json", "llmqgen-export.json",
                                                    "model.safetensors"]
    assert (hf / "README.md").read_text() == "another model"
    assert (hf / "config.json").read_bytes() == (tmp_path / "r" / "model" / "config.json").read_bytes()


def test_export_over_an_earlier_export_replaces_its_files(run, data, tmp_path):
    import json
    from llmqgen.checkpoint.safetensors import read_dir
    train(run, data, tmp_path / "r", steps=1, warmup=0)
    hf = tmp_path / "hf"
    res = export(tmp_path / "r", hf, "--shard-size", "0.0001")
    assert res.exit_code == 0, res.output
    shards = sorted(p.name for p in hf.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1
    assert json.loads((hf / "llmqgen-export.json").read_text())["files"] == \
        shards + ["model.safetensors.index.json", "config.json"]
    res = export(tmp_path / "r", hf)                    # one file now: the shards and index go
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "llmqgen-export.json", "model.safetensors"]
    assert read_dir(hf).keys() == read_dir(tmp_path / "r" / "model").keys()
    (hf / "notes.txt").write_text("mine")               # a file of the user's: no longer the export's alone
    assert "holds files that no llmqgen export wrote (notes.txt)" in one_line(export(tmp_path / "r", hf))


def test_an_interrupted_export_is_still_the_exports(run, data, tmp_path, monkeypatch):
    import llmqgen.checkpoint.safetensors as st
    train(run, data, tmp_path / "r", steps=1, warmup=0)
    hf = tmp_path / "hf"
    assert ok(export(tmp_path / "r", hf))
    real, calls = st._save_file, []

    def save_file(path, *a):
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real(path, *a)
    monkeypatch.setattr(st, "_save_file", save_file)
    assert "No space left on device" in one_line(export(tmp_path / "r", hf, "--shard-size", "0.0001"))
    monkeypatch.setattr(st, "_save_file", real)
    assert ok(export(tmp_path / "r", hf))                 # the folder is all the exports' still: no --force
    assert sorted(p.name for p in hf.iterdir()) == ["config.json", "llmqgen-export.json", "model.safetensors"]


def test_a_manifest_naming_files_elsewhere_is_not_an_export(run, data, tmp_path):
    import json
    train(run, data, tmp_path / "r", steps=1, warmup=0)
    hf = tmp_path / "hf"
    hf.mkdir()
    (tmp_path / "victim").write_text("keep")
    (hf / "config.json").write_text("{}")
    (hf / "llmqgen-export.json").write_text(json.dumps({"files": ["config.json", "../victim"]}))
    assert "holds files that no llmqgen export wrote (config.json)" in one_line(export(tmp_path / "r", hf))
    assert ok(export(tmp_path / "r", hf, "--force"))
    assert (tmp_path / "victim").read_text() == "keep"


def test_a_resumed_run_replaces_its_own_earlier_export(run, data, tmp_path):
    """The run's model/ is an earlier export of the run: replaced at the end of a resume, also when an older
    llmqgen wrote it (no manifest)."""
    out = tmp_path / "r"
    train(run, data, out, steps=2, warmup=1)
    (out / "model" / "llmqgen-export.json").unlink()
    train(run, data, out, resume="latest", steps=3)
    assert ok(export(out, tmp_path / "hf"))
    assert (out / "model" / "model.safetensors").read_bytes() == (tmp_path / "hf" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_files_follow_the_umask(run, data, tmp_path, umask):
    import os
    saved = os.umask(umask)
    try:
        train(run, data, tmp_path / "r", steps=1, warmup=0)
        assert ok(export(tmp_path / "r", tmp_path / "hf", "--shard-size", "0.0001"))
    finally:
        os.umask(saved)
    for folder in (tmp_path / "r" / "model", tmp_path / "hf"):
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in folder.iterdir()}
        assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


# --- which checkpoints are written and kept -----------------------------------------------------------

def steps_kept(out: Path) -> list[int]:
    from llmqgen.checkpoint.store import list_checkpoints
    return [s for s, _ in list_checkpoints(out / "checkpoints")]


@pytest.mark.parametrize("minutes, kept", [(60, [3, 6, 8]), (100, [4, 8]), (0, [8])])
def test_checkpoint_minutes_checkpoints_a_long_run_along_the_way(run, data, tmp_path, monkeypatch, minutes, kept):
    """Each step takes 25 minutes by the stand-in clock."""
    now = [0.0]
    real = FakeTrainer.accumulate

    def accumulate(self, batches):
        real(self, batches)
        now[0] += 25 * 60
    monkeypatch.setattr(FakeTrainer, "accumulate", accumulate)
    monkeypatch.setattr(run, "_wall", lambda: now[0])
    train(run, data, tmp_path / "r", steps=8, warmup=1, checkpoint_minutes=minutes, keep_last=0)
    assert steps_kept(tmp_path / "r") == kept


@pytest.mark.parametrize("keep, kept", [(None, [3, 4, 5]), ("2", [4, 5]), ("0", [1, 2, 3, 4, 5])])
def test_cli_keep_last(run, data, tmp_path, plan_file, keep, kept):
    out = tmp_path / "r"
    assert ok(CliRunner().invoke(main, ["run", "--plan", str(plan_file), "--data", str(data), "--out", str(out),
                                        "--steps", "5", "--warmup", "1", "--checkpoint-every", "1"]
                                 + (["--keep-last", keep] if keep else [])))
    assert steps_kept(out) == kept


def test_a_resume_keeps_the_runs_keeping_settings(run, data, tmp_path):
    """A run that keeps every checkpoint (--keep-last 0), resumed without it: the saved 0 stands, so its
    first save deletes nothing (it fell back to 3 and deleted steps 1 and 2); given again, a value wins."""
    out = tmp_path / "r"
    train(run, data, out, steps=6, warmup=1, checkpoint_every=1, keep_last=0, stop_after=3)
    train(run, data, out, steps=6, warmup=1, resume="latest", stop_after=5)
    assert steps_kept(out) == [1, 2, 3, 4, 5]
    train(run, data, out, steps=6, warmup=1, resume="latest", keep_last=2)
    assert steps_kept(out) == [5, 6]


def test_a_resume_from_an_earlier_step_does_not_write_over_later_checkpoints(run, data, tmp_path, plan_file):
    """Resuming step 2 of a run with steps 1-6 overwrote steps 3-6 (and --keep-last deleted the rest): it is
    refused, by the library and by the CLI before the GPU is needed, until they are moved away."""
    out = tmp_path / "r"
    train(run, data, out, steps=6, warmup=1, checkpoint_every=1, keep_last=0)
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"at step 2 would write over its later checkpoints \(steps 3, 4, 5, 6\)"):
        train(run, data, out, steps=6, warmup=1, resume="2", change=("lr",), lr=1e-4)
    line = one_line(CliRunner().invoke(main, ["run", "--plan", str(plan_file), "--out", str(out), "--resume", "2"]))
    assert "would write over its later checkpoints (steps 3, 4, 5, 6): resume latest, or move" in line
    assert snapshot(out) == before
    for s in (3, 4, 5, 6):
        (out / "checkpoints" / f"step-{s:06d}").rename(tmp_path / f"kept-{s}")
    train(run, data, out, steps=6, warmup=1, resume="2")
    assert steps_kept(out) == [1, 2, 3, 4, 5, 6]


def test_the_disk_full_hint_names_an_option_that_exists(tmp_path, monkeypatch):
    import errno

    import numpy as np

    import llmqgen.checkpoint.store as store

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store, "write_safetensors", full)
    with pytest.raises(store.CheckpointError, match="lower --keep-last,") as e:
        store.save_checkpoint(tmp_path, 1, {"w": np.zeros(2, np.float32)}, {}, "{}")
    assert "no earlier checkpoint exists" in str(e.value)
    for cmd in ("run", "train"):
        assert "--keep-last" in CliRunner().invoke(main, [cmd, "--help"]).output


def test_the_last_step_is_checkpointed_once(run, data, tmp_path, monkeypatch):
    saved = []
    real = run.save_checkpoint
    monkeypatch.setattr(run, "save_checkpoint",
                        lambda root, step, *a, **k: saved.append(step) or real(root, step, *a, **k))
    train(run, data, tmp_path / "r", steps=4, warmup=1, checkpoint_every=2)
    assert saved == [2, 4]
