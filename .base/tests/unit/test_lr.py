"""LR schedules: endpoints, monotonicity, continuity at the joints, clamping, validation."""
import math

import numpy as np
import pytest
from pydantic import ValidationError

from llmqgen.runtime.lr import LRSchedule

KINDS = ["cosine", "linear", "wsd", "constant"]


def curve(s: LRSchedule, extra: int = 5) -> np.ndarray:
    return np.array([s.lr(i) for i in range(s.total_steps + extra)])


@pytest.mark.parametrize("kind", KINDS)
def test_warmup_rises_linearly_from_peak_over_warmup_to_peak(kind):
    s = LRSchedule(peak=3e-4, warmup_steps=10, total_steps=100, kind=kind)
    assert s.lr(0) == pytest.approx(3e-4 / 10)
    assert s.lr(9) == pytest.approx(3e-4)
    np.testing.assert_allclose(curve(s)[:10], 3e-4 * np.arange(1, 11) / 10, rtol=1e-12)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("warmup", [0, 1, 7])
def test_decay_ends_at_final_fraction_and_clamps_after_total(kind, warmup):
    s = LRSchedule(peak=1.0, warmup_steps=warmup, total_steps=50, kind=kind, final_fraction=0.1)
    assert s.lr(warmup) == pytest.approx(1.0)   # the peak, right after warmup
    assert s.lr(50) == pytest.approx(0.1)
    assert all(s.lr(t) == pytest.approx(0.1) for t in (51, 77, 10_000))
    assert s.lr(49) > 0.1


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("warmup,total", [(0, 1), (0, 40), (5, 40), (40, 40), (3, 1000)])
def test_monotone_rise_then_monotone_fall(kind, warmup, total):
    s = LRSchedule(peak=2e-3, warmup_steps=warmup, total_steps=total, kind=kind, final_fraction=0.05)
    c = curve(s)
    assert np.all(c > 0) and np.all(c <= 2e-3 * (1 + 1e-12))
    top = int(np.argmax(c))
    assert np.all(np.diff(c[: top + 1]) >= 0)
    assert np.all(np.diff(c[top:]) <= 1e-18)


@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_continuity_at_the_warmup_joint(kind):
    # 1000 steps: neighbouring steps differ by at most one warmup increment or a small decay slope
    s = LRSchedule(peak=1.0, warmup_steps=100, total_steps=1000, kind=kind, final_fraction=0.0)
    c = curve(s)
    assert np.max(np.abs(np.diff(c))) <= 1 / 100 + 1e-12
    assert c[99] == pytest.approx(1.0) and c[100] == pytest.approx(1.0)
    assert 1.0 - c[101] < 1 / 100


def test_cosine_midpoint_and_shape():
    s = LRSchedule(peak=1.0, warmup_steps=0, total_steps=100, kind="cosine", final_fraction=0.2)
    assert s.lr(50) == pytest.approx(0.2 + 0.8 * 0.5)
    t = np.arange(0, 101)
    np.testing.assert_allclose(curve(s, extra=1), 0.2 + 0.8 * 0.5 * (1 + np.cos(np.pi * t / 100)))


def test_linear_decay_by_hand():
    s = LRSchedule(peak=1.0, warmup_steps=10, total_steps=110, kind="linear", final_fraction=0.0)
    assert s.lr(10) == pytest.approx(1.0)
    assert s.lr(60) == pytest.approx(0.5)
    assert s.lr(85) == pytest.approx(0.25)


def test_wsd_holds_peak_then_decays_over_the_last_fifth():
    s = LRSchedule(peak=1.0, warmup_steps=10, total_steps=100, kind="wsd", final_fraction=0.0)
    c = curve(s)
    assert s.decay_start == 80
    assert np.all(c[9:81] == 1.0)                   # stable phase, joints included
    assert c[90] == pytest.approx(0.5) and c[100] == 0.0
    np.testing.assert_allclose(c[80:101], 1.0 - np.arange(21) / 20)


def test_wsd_cooldown_never_starts_inside_warmup():
    s = LRSchedule(peak=1.0, warmup_steps=60, total_steps=100, kind="wsd", cooldown_fraction=0.5,
                   final_fraction=0.0)
    assert s.decay_start == 60
    assert s.lr(59) == 1.0 and s.lr(60) == 1.0 and s.lr(80) == pytest.approx(0.5)


def test_wsd_without_cooldown_is_constant_until_total():
    s = LRSchedule(peak=1.0, warmup_steps=0, total_steps=30, kind="wsd", cooldown_fraction=0.0)
    assert all(s.lr(t) == 1.0 for t in range(30))
    assert s.lr(30) == pytest.approx(0.1)


def test_constant_ignores_final_fraction():
    s = LRSchedule(peak=5e-4, warmup_steps=4, total_steps=20, kind="constant", final_fraction=0.0)
    assert s.lr(3) == 5e-4 and s.lr(19) == 5e-4 and s.lr(500) == 5e-4


def test_warmup_equal_to_total_ends_at_final():
    s = LRSchedule(peak=1.0, warmup_steps=10, total_steps=10, kind="cosine")
    assert s.lr(9) == 1.0 and s.lr(10) == pytest.approx(0.1)


def test_values_are_plain_finite_floats():
    s = LRSchedule(peak=3e-4, warmup_steps=2, total_steps=10)
    assert all(type(s.lr(t)) is float and math.isfinite(s.lr(t)) for t in range(12))


def test_frozen_and_validated():
    s = LRSchedule(peak=1e-3, warmup_steps=1, total_steps=10)
    with pytest.raises(ValidationError):
        s.peak = 2e-3
    with pytest.raises(ValidationError, match="shorten the warmup"):
        LRSchedule(peak=1e-3, warmup_steps=11, total_steps=10)
    good = {"peak": 1e-3, "warmup_steps": 0, "total_steps": 10}
    for bad in ({"peak": 0.0}, {"total_steps": 0}, {"final_fraction": 1.5}, {"kind": "step"},
                {"cooldown_fraction": -0.1}):
        with pytest.raises(ValidationError):
            LRSchedule(**{**good, **bad})
    with pytest.raises(ValueError, match=">= 0"):
        s.lr(-1)
