"""Skip every test marked `gpu` when the NVIDIA driver (asked through cuda.bindings, not torch) has no GPU."""
import pytest

from harness import gpu_unavailable_reason


def pytest_collection_modifyitems(config, items):
    reason = gpu_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"GPU test skipped: {reason}")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
