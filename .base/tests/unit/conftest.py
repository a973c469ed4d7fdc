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
