"""The measured peak device memory (runtime/devmem.py) through a fake NVML: this process's count where
NVML lists it, the GPU's used memory less its use before the run where it does not, nothing (and why)
without pynvml or a driver; and the plan's number it is compared with."""
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fake_trainer import _Dev, fake_nvml  # noqa: E402

from llmqgen.plan.calibration import CONTEXT_RESERVE  # noqa: E402
from llmqgen.plan.lifetimes import packed_table  # noqa: E402
from llmqgen.plan.memory import arena_peak  # noqa: E402
from llmqgen.plan.schema import Plan  # noqa: E402
from llmqgen.runtime import driver  # noqa: E402
from llmqgen.runtime.devmem import DeviceMemory, MemoryReport, planned_device_bytes, ranks_on_first_gpu  # noqa: E402

PLANS = sorted((Path(__file__).resolve().parents[2] / "plans").glob("*.json"))
GiB = 1 << 30


def measure(steps=3) -> DeviceMemory:
    mem = DeviceMemory()                    # before the Trainer
    mem.watch(_Dev())                       # the Trainer has opened the GPU
    for _ in range(steps):
        mem.sample()
    mem.close()
    return mem


def test_this_process_as_nvml_lists_it(monkeypatch):
    nvml = fake_nvml(monkeypatch, process_bytes=3 * GiB)
    mem = measure()
    assert (mem.peak, mem.method, mem.why) == (3 * GiB, "process", "")
    assert nvml.inits == 0                  # every nvmlInit matched by a shutdown
    assert mem.sample() is None             # closed


def test_the_peak_is_the_largest_sample(monkeypatch):
    nvml = fake_nvml(monkeypatch, process_bytes=2 * GiB)
    mem = DeviceMemory()
    mem.watch(_Dev())
    assert mem.sample() == 2 * GiB
    nvml.process_bytes = 3 * GiB
    mem.sample()
    nvml.process_bytes = GiB
    assert mem.sample() == GiB and mem.peak == 3 * GiB
    mem.close()


def test_without_this_process_in_nvmls_list_the_gpus_growth(monkeypatch):
    fake_nvml(monkeypatch, process_bytes=3 * GiB, baseline=700 << 20, listed=False)
    mem = measure()
    assert (mem.peak, mem.method) == (3 * GiB, "device")
    line = mem.report(Plan.from_json(PLANS[0].read_text())).line()
    assert line.startswith("device memory: peak 3.00 GiB (NVML, the GPU's used memory less its use before the run), ")


def test_without_pynvml_nothing_is_measured_and_the_line_says_so(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)        # import pynvml raises ImportError
    mem = measure()
    assert mem.peak is None and mem.method is None and mem.why == "pynvml is missing: pip install nvidia-ml-py"
    plan = Plan.from_json(PLANS[0].read_text())
    r = mem.report(plan)
    assert r.ratio is None and r.fields()["peak_mem_bytes"] is None
    assert r.line() == (f"device memory: not measured (pynvml is missing: pip install nvidia-ml-py); the plan's "
                        f"{planned_device_bytes(plan) / GiB:.2f} GiB (arena + CUDA context)")
    assert MemoryReport.from_fields(r.fields()) == r


def test_without_a_driver_nothing_is_measured(monkeypatch):
    fake_nvml(monkeypatch, fail_init=True)
    mem = measure()
    assert mem.peak is None and mem.why == "NVML failed (Driver Not Loaded)"


def test_a_gpu_nvml_does_not_list(monkeypatch):
    fake_nvml(monkeypatch)
    monkeypatch.setattr(driver, "pci_bus_id", lambda dev: "0000:3b:00.0")
    mem = measure()
    assert mem.peak is None and mem.why == "NVML does not list the GPU at 0000:3b:00.0"


@pytest.mark.parametrize("path", PLANS, ids=lambda p: p.stem)
def test_the_plans_number_is_its_total_per_gpu(path):
    """The packed arena plus the CUDA-context reserve: what `llmqgen plan` prints as "total per GPU"."""
    plan = Plan.from_json(path.read_text())
    total = planned_device_bytes(plan)
    assert total == plan.estimate.device_bytes == arena_peak(packed_table(plan)) + CONTEXT_RESERVE
    assert planned_device_bytes(plan, 2) == 2 * total


def test_ranks_sharing_the_first_gpu():
    assert ranks_on_first_gpu(None) == 1
    assert ranks_on_first_gpu([0, 1, 2, 3]) == 1
    assert ranks_on_first_gpu([0, 0]) == 2


def test_the_report_line():
    r = MemoryReport(int(15.31 * GiB), "process", int(15.47 * GiB))
    assert r.line() == "device memory: peak 15.31 GiB (NVML, this process), 99.0% of the plan's 15.47 GiB " \
                       "(arena + CUDA context)"
    two = MemoryReport(GiB, "process", 2 * GiB, ranks_on_gpu=2)
    assert two.line().endswith("50.0% of the plan's 2.00 GiB (arena + CUDA context, 2 ranks on this GPU)")
