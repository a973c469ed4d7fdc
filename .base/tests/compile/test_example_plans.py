"""Every checked-in example plan renders deterministically and compiles, without spills, for every
GPU family we support; a second build is a cache hit."""
import time
from pathlib import Path

import pytest

from llmqgen.codegen.render import render
from llmqgen.compile.cache import build
from llmqgen.plan.schema import Plan

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))
ARCHS = ["sm_89", "sm_90", "sm_120"]


def test_the_issue_examples_are_checked_in():
    names = {p.stem for p in PLANS}
    assert {"qwen2.5-0.5b-fp8-1xh200", "qwen2.5-7b-fp8-1x4060ti-block", "qwen2.5-32b-fp8-4x4090",
            "qwen3-0.6b-bf16-1x4090", "llama3.2-1b-fp8-1x4090"} <= names


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_render_is_deterministic(path):
    plan = Plan.from_json(path.read_text())
    a, b = render(plan, "sm_90"), render(plan, "sm_90")
    assert a.source == b.source and a.source.startswith("//")
    assert [k.to_json() for k in a.kernels] == [k.to_json() for k in b.kernels]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_compiles_without_spills(path, arch, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMQGEN_CACHE_DIR", str(tmp_path / "cache"))
    plan = Plan.from_json(path.read_text())
    t0 = time.perf_counter()
    first = build(plan, arch, out_root=tmp_path / "build")
    wall = time.perf_counter() - t0
    assert not first.cache_hit and first.cubin_bytes > 0
    assert first.spills == [], f"{path.stem} {arch}: kernels spill registers: {first.spills}"
    again = build(plan, arch, out_root=tmp_path / "build")
    assert again.cache_hit and again.cubin_path.read_bytes() == first.cubin_path.read_bytes()
    with capsys.disabled():
        print(f"\n  compile {path.stem} {arch}: {first.compile_seconds:.1f} s NVRTC, {wall:.1f} s total, "
              f"{first.cubin_bytes / 1024:.0f} KiB")
