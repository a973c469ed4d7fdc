"""Build folders (codegen/folder.py, compile/build_folder.py): the golden build is what the current code
writes; the loader's typed object; its errors (missing or changed file, foreign plan, another format, a
rendered folder where a compiled one is needed, LLMQGEN_NO_COMPILE without a build); try-load, lock,
build, load."""
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from golden_build import GOLDEN, NVRTC, REGENERATE, golden_plan, write_golden  # noqa: E402

from llmqgen.codegen.folder import CUBIN, MANIFEST, RUNTIME_FILES, write_manifest  # noqa: E402
from llmqgen.compile import build_folder  # noqa: E402
from llmqgen.compile.build_folder import LOCK, NO_COMPILE, BuildFolderError, folder_of, load, open_build  # noqa: E402
from llmqgen.plan.lifetimes import packed_table  # noqa: E402

ARCH = "sm_90"


def test_the_golden_build_is_what_the_code_writes(tmp_path):
    write_golden(tmp_path / "golden")
    names = sorted(p.name for p in GOLDEN.iterdir())
    assert names == sorted(p.name for p in (tmp_path / "golden").iterdir()) == sorted((MANIFEST, *RUNTIME_FILES))
    stale = [n for n in names if (GOLDEN / n).read_bytes() != (tmp_path / "golden" / n).read_bytes()]
    assert not stale, (f"the golden build {GOLDEN} is out of date with the code ({', '.join(stale)} differ): "
                       f"regenerate it with `{REGENERATE}` and review its diff")


def test_the_loaded_folder_is_the_plans_layout_kernels_and_schedule():
    plan = golden_plan()
    f = load(GOLDEN, plan, compiled=False)
    assert f.plan.inputs() == plan.inputs() and f.arch == ARCH and f.cubin is None
    assert list(f.rows.values()) == packed_table(plan)
    assert f.schedule["layers"] == plan.model.num_layers and f.schedule["plan"] == plan.name
    assert [k.name for k in f.by_role("attention_backward")] == ["llmq_attention_bwd_dot", "llmq_attention_backward"]
    assert f.kernel("reduce_scatter").name == "llmq_reduce_bf16" and f.by_role("no such role") == []
    with pytest.raises(BuildFolderError, match="2 kernels of role 'attention_backward'"):
        f.kernel("attention_backward")


@pytest.fixture
def copy(tmp_path):
    dst = tmp_path / "folder"
    shutil.copytree(GOLDEN, dst)
    return dst


def test_a_rendered_folder_is_not_a_compiled_one(copy):
    with pytest.raises(BuildFolderError, match="lists no program.cubin .rendered, not compiled"):
        load(copy, golden_plan())
    (copy / CUBIN).write_bytes(b"cubin")
    write_manifest(copy, ARCH, NVRTC, compiled=True)
    assert load(copy, golden_plan()).cubin == b"cubin"


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "layout.json").unlink(), "incomplete: layout.json is missing"),
    (lambda d: (d / MANIFEST).unlink(), r"not a complete build \(build.json is missing\)"),
    (lambda d: (d / "schedule.json").write_text("[]\n"), "schedule.json differs from the one built"),
    (lambda d: (d / MANIFEST).write_text('{"schema": 99}'), "build of format 99, this llmqgen reads format 1"),
    (lambda d: (d / MANIFEST).write_text("{"), "cannot read the manifest"),
])
def test_a_damaged_folder_is_one_clear_error(copy, damage, message):
    damage(copy)
    with pytest.raises(BuildFolderError, match=message) as e:
        load(copy, golden_plan(), compiled=False)
    assert "\n" not in str(e.value)


def test_a_foreign_plan_is_refused(copy):
    other = golden_plan().model_copy(update={"lm_head_chunks": 2})
    with pytest.raises(BuildFolderError, match="holds plan tiny-qwen2-fp8 .* not plan tiny-qwen2-fp8 .*own folder"):
        load(copy, other, compiled=False)


@pytest.fixture
def builds(monkeypatch):
    """compile.cache.build replaced by a copy of the golden folder with a stand-in CUBIN; the plans it built."""
    monkeypatch.setattr(build_folder, "nvrtc_version", lambda: NVRTC)
    monkeypatch.delenv(NO_COMPILE, raising=False)
    built = []

    def build(plan, arch, out_root):
        built.append(plan.name)
        complete(folder_of(plan, arch, out_root))
    monkeypatch.setattr(build_folder, "build", build)
    return built


def complete(folder: Path) -> None:
    shutil.copytree(GOLDEN, folder, dirs_exist_ok=True)
    (folder / CUBIN).write_bytes(b"cubin")
    write_manifest(folder, ARCH, NVRTC, compiled=True)


def test_open_build_builds_a_missing_folder_once(builds, tmp_path):
    plan = golden_plan()
    f = open_build(plan, ARCH, tmp_path)
    assert builds == [plan.name] and f.path == folder_of(plan, ARCH, tmp_path) and f.cubin == b"cubin"
    assert open_build(plan, ARCH, tmp_path).path == f.path and builds == [plan.name]      # loaded, not rebuilt


def test_no_compile_without_a_build_names_the_build_command(builds, monkeypatch, tmp_path):
    monkeypatch.setenv(NO_COMPILE, "1")
    with pytest.raises(BuildFolderError, match=f"{NO_COMPILE} is set, so it is not built here: run `llmqgen "
                                                f"build --plan PLAN.json --arch sm_90 --out {tmp_path}`") as e:
        open_build(golden_plan(), ARCH, tmp_path)
    assert builds == [] and "\n" not in str(e.value)
    complete(folder_of(golden_plan(), ARCH, tmp_path))           # built elsewhere: loaded without compiling
    assert open_build(golden_plan(), ARCH, tmp_path).cubin == b"cubin" and builds == []


def test_a_build_waits_for_the_folders_lock_and_loads_what_the_holder_built(builds, tmp_path):
    plan = golden_plan()
    folder = folder_of(plan, ARCH, tmp_path)
    got = []
    folder.mkdir(parents=True)
    with FileLock(folder / LOCK):                   # another process is building the folder
        t = threading.Thread(target=lambda: got.append(open_build(plan, ARCH, tmp_path)))
        t.start()
        time.sleep(0.3)
        assert t.is_alive() and not got
        complete(folder)
    t.join(10)
    assert got and got[0].path == folder and builds == []
