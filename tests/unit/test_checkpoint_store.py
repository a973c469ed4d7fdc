"""Checkpoint store: save/load, `latest`, pruning, crash and disk-full safety, model check, export."""
import errno
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from click.testing import CliRunner

from llmqgen.checkpoint import store
from llmqgen.checkpoint.cli import export
from llmqgen.checkpoint.store import (CheckpointError, list_checkpoints, load_checkpoint,
                                     save_checkpoint)
from llmqgen.models.hf_names import param_shapes
from llmqgen.models.spec import ModelSpec

SPEC = ModelSpec(name="tiny-qwen2", architecture="qwen2", hidden_size=16, intermediate_size=24,
                 num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, vocab_size=32,
                 tie_embeddings=True, qkv_bias=True, qk_norm=False, rope_theta=1e6)


def plan_json(spec=SPEC):
    return json.dumps({"name": "p", "model": spec.model_dump(mode="json")})


def tensors(step):
    t = {k: np.full(s, step, np.float32) for k, s in param_shapes(SPEC).items()}
    t["adam.m.embedding"] = np.full((32, 16), -step, ml_dtypes.bfloat16)
    return t


def state(step):
    return {"lr_step": step, "loader": {"seed": 1, "epoch": 0, "position": 8 * step},
            "rng": {"stochastic_rounding": 1234 + step}}


def test_save_load_latest(tmp_path):
    for s in (10, 20):
        path = save_checkpoint(tmp_path, s, tensors(s), state(s), plan_json())
    assert path.name == "step-000020" and (tmp_path / "latest").read_text().strip() == path.name
    t, st, pj = load_checkpoint(tmp_path)
    assert st["step"] == 20 and st["loader"]["position"] == 160 and "llmqgen_version" in st
    np.testing.assert_array_equal(t["layers.1.qkv"], 20)
    assert t["adam.m.embedding"].dtype == ml_dtypes.bfloat16 and pj == plan_json()
    assert load_checkpoint(tmp_path, 10)[1]["step"] == 10
    assert load_checkpoint(tmp_path / "step-000010")[1]["step"] == 10
    with pytest.raises(CheckpointError, match="have steps 10, 20"):
        load_checkpoint(tmp_path, 15)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        load_checkpoint(tmp_path / "empty")


def test_resave_same_step(tmp_path):
    save_checkpoint(tmp_path, 5, tensors(5), state(5), plan_json())
    save_checkpoint(tmp_path, 5, tensors(6), state(5), plan_json())
    np.testing.assert_array_equal(load_checkpoint(tmp_path)[0]["final_norm"], 6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000005"]


def test_prune_keep_last_and_every(tmp_path):
    for s in range(100, 1100, 100):
        save_checkpoint(tmp_path, s, tensors(1), state(s), plan_json(), keep_last=2, keep_every=300)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [300, 600, 900, 1000]


def test_model_mismatch(tmp_path):
    save_checkpoint(tmp_path, 1, tensors(1), state(1), plan_json())
    other = SPEC.model_copy(update={"name": "qwen2.5-1.5b"})
    with pytest.raises(CheckpointError, match="checkpoint is of tiny-qwen2, this run is qwen2.5-1.5b"):
        load_checkpoint(tmp_path, expect=other)
    with pytest.raises(CheckpointError, match="differs .* in num_layers"):
        load_checkpoint(tmp_path, expect=SPEC.model_copy(update={"num_layers": 3}))
    load_checkpoint(tmp_path, expect=SPEC)


def test_injected_failure_keeps_previous(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, tensors(1), state(1), plan_json())
    real = store._write_text

    def fail_on_plan(path, text):
        if path.name == store.PLAN:               # tensors and state already written
            raise RuntimeError("injected")
        real(path, text)
    monkeypatch.setattr(store, "_write_text", fail_on_plan)
    with pytest.raises(RuntimeError, match="injected"):
        save_checkpoint(tmp_path, 2, tensors(2), state(2), plan_json())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    assert load_checkpoint(tmp_path)[1]["step"] == 1


def test_disk_full(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, 1, tensors(1), state(1), plan_json())

    def enospc(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(store, "write_safetensors", enospc)
    with pytest.raises(CheckpointError, match="disk full.*step-000001 is intact"):
        save_checkpoint(tmp_path, 2, tensors(2), state(2), plan_json())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-000001"]
    np.testing.assert_array_equal(load_checkpoint(tmp_path)[0]["embedding"], 1)


def test_sigkill_mid_save(tmp_path):
    """A writer killed while writing step 2's tensors leaves step 1 loadable and `latest` on it."""
    code = textwrap.dedent(f"""
        import sys, time, numpy as np
        from llmqgen.checkpoint import store
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from test_checkpoint_store import tensors, state, plan_json
        store.save_checkpoint({str(tmp_path)!r}, 1, tensors(1), state(1), plan_json())
        real = store.write_safetensors
        def slow(path, t, **kw):
            real(path, dict(list(t.items())[:3]))       # a partial file on disk
            print("WRITING", flush=True)
            time.sleep(60)
        store.write_safetensors = slow
        store.save_checkpoint({str(tmp_path)!r}, 2, tensors(2), state(2), plan_json())
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "WRITING"
        assert any(".tmp-" in p.name for p in tmp_path.iterdir())
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    t, st, _ = load_checkpoint(tmp_path)
    assert st["step"] == 1
    np.testing.assert_array_equal(t["layers.0.down"], 1)
    save_checkpoint(tmp_path, 3, tensors(3), state(3), plan_json())     # cleans the dead temp dir
    assert not any(".tmp-" in p.name for p in tmp_path.iterdir())


def test_files_recorded_and_damage_found(tmp_path, caplog):
    """state.json records each file's size and SHA-256; `latest` passes over a damaged newest checkpoint
    (warning), an explicitly named damaged one is refused naming the newest intact one."""
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, tensors(s), state(s), plan_json())
    st = json.loads((tmp_path / "step-000003" / store.STATE).read_text())
    t = tmp_path / "step-000003" / store.TENSORS
    assert st["files"][store.TENSORS]["bytes"] == t.stat().st_size
    assert store.verify(tmp_path / "step-000003") is None
    data = bytearray(t.read_bytes())
    data[-1] ^= 0xFF                                        # a flipped bit: same size, another hash
    t.write_bytes(bytes(data))
    assert "SHA-256" in store.verify(tmp_path / "step-000003")
    assert store.verify(tmp_path / "step-000003", deep=False) is None
    caplog.set_level(logging.WARNING, logger="llmqgen")
    assert store.resolve(tmp_path, "latest").name == "step-000002"
    assert caplog.messages == [f"checkpoint step-000003 is damaged ({store.TENSORS} does not match the SHA-256 recorded "
                      "when it was written); using step-000002 instead"]
    with pytest.raises(CheckpointError, match="step-000003 is damaged: .*newest intact checkpoint is step-000002"):
        load_checkpoint(tmp_path, 3)
    with pytest.raises(CheckpointError, match="newest intact checkpoint is step-000002"):
        load_checkpoint(tmp_path / "step-000003")
    (tmp_path / "step-000002" / store.TENSORS).unlink()
    assert store.resolve(tmp_path).name == "step-000001"
    # a step that is not there: the steps that are, a damaged one marked (by the cheap check: sizes, files)
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 7; have steps 1, 2 \(damaged\), 3$"):
        load_checkpoint(tmp_path, 7)
    with open(tmp_path / "step-000001" / store.TENSORS, "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match="every checkpoint is damaged"):
        load_checkpoint(tmp_path)


def test_a_state_whose_step_is_not_its_folders_is_damaged(tmp_path):
    """state.json has no hash of its own: an edited step (4 -> 5 in step-000004) is caught by the folder's name."""
    path = save_checkpoint(tmp_path, 4, tensors(4), state(4), plan_json())
    st = json.loads((path / store.STATE).read_text())
    (path / store.STATE).write_text(json.dumps({**st, "step": 5}))
    assert store.verify(path) == f"{store.STATE} says step 5, the folder is step 4"


def test_old_checkpoint_without_recorded_files_is_checked_by_header(tmp_path):
    save_checkpoint(tmp_path, 1, tensors(1), state(1), plan_json())
    path = tmp_path / "step-000001"
    st = json.loads((path / store.STATE).read_text())
    del st["files"]
    (path / store.STATE).write_text(json.dumps(st))
    assert store.verify(path) is None
    with open(path / store.TENSORS, "r+b") as f:
        f.truncate(path.joinpath(store.TENSORS).stat().st_size // 2)
    assert "truncated" in store.verify(path)


def test_export_needs_a_checkpoint(tmp_path):
    res = CliRunner().invoke(export, [str(tmp_path / "nothing"), str(tmp_path / "x")])
    assert res.exit_code == 2 and res.output.startswith("error: ") and "no checkpoint found" in res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1


@pytest.mark.parametrize("where, said", [("checkpoint", "cannot read {ck}/tensors.safetensors: Permission denied"),
                                         ("export", "cannot write {out}: No space left on device")])
def test_export_names_the_side_an_os_error_came_from(tmp_path, monkeypatch, where, said):
    """A checkpoint that cannot be read is not blamed on OUT_DIR (a fresh user's chmod 000 said 'cannot
    write OUT_DIR')."""
    import llmqgen.checkpoint.cli as cli
    ck, out = tmp_path / "run" / "checkpoints" / "step-000004", tmp_path / "out"

    def fail(*a, **k):
        if where == "checkpoint":
            raise PermissionError(errno.EACCES, "Permission denied", str(ck / "tensors.safetensors"))
        raise OSError(errno.ENOSPC, "No space left on device", str(out / "model.safetensors"))
    monkeypatch.setattr(cli, "read_checkpoint", fail)
    res = CliRunner().invoke(export, [str(tmp_path / "run"), str(out)])
    assert res.exit_code == 2 and res.output.strip() == "error: " + said.format(ck=ck, out=out), res.output
