"""Fixtures of the tests that run the real training loop on CPU (tests/fake_trainer.py). fake_trainer is
imported inside them: importing it stubs the GPU-only modules, which other tests must not see."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture
def run(monkeypatch):
    """runtime.run with the stand-in Trainer installed, and NVML faked (fake_trainer.fake_nvml)."""
    from fake_trainer import fake_nvml, install, uninstall
    fake_nvml(monkeypatch)
    mod = install()
    yield mod
    uninstall()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A tiny synthetic token dataset, one per test module."""
    from fake_trainer import tiny_data
    return tiny_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def plan_error(tmp_path):
    """plan_error(args) -> the one error line `llmqgen plan --model 0.5b` (on 1xH200 unless args name --gpus)
    prints for bad `args`, after checking the exit code (2), that no traceback shows and that no plan is written."""
    from click.testing import CliRunner

    from llmqgen.cli import main

    def run(args: list[str]) -> str:
        gpus = [] if "--gpus" in args else ["--gpus", "1xH200"]
        r = CliRunner().invoke(main, ["plan", "--model", "0.5b", *gpus, "--out", str(tmp_path), *args])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        errors = [line for line in r.output.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, r.output
        assert not list(tmp_path.iterdir())
        return errors[0]
    return run
