"""``benchmarks/shapes/compare_curves.py``: the fitted rise of a run's training reward."""

from __future__ import annotations

import math

import pytest
from scripts import load_script

curves = load_script("benchmarks/shapes/compare_curves.py")


def test_the_fitted_rise_of_a_straight_line_is_its_rise_with_no_width():
    rise, lo, hi = curves.fitted_rise([0.5 + 0.01 * i for i in range(11)])
    assert rise == pytest.approx(0.1, abs=1e-12)
    assert lo == pytest.approx(0.1, abs=1e-12) and hi == pytest.approx(0.1, abs=1e-12)


def test_the_fitted_rise_has_the_hand_computed_t_interval():
    values = [0.0, 1.0, 0.0, 1.0, 1.0]  # x = 0..4: slope 0.2, residual SS 0.8, Sxx 10
    rise, lo, hi = curves.fitted_rise(values)
    half = 3.182446305284263 * math.sqrt(0.8 / 3 / 10)  # t(0.975, 3 df) * stderr of the slope
    assert rise == pytest.approx(0.8, abs=1e-12)
    assert (lo, hi) == (pytest.approx((0.2 - half) * 4, abs=1e-9), pytest.approx((0.2 + half) * 4, abs=1e-9))


def test_a_fitted_rise_needs_three_values():
    with pytest.raises(ValueError, match="at least 3"):
        curves.fitted_rise([0.1, 0.2])
