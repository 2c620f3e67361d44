"""The Fréchet distance against the textbook formula (matrix square root of the product)."""

from __future__ import annotations

import numpy as np
import pytest

from lumos.evaluation.frechet import frechet_distance


def _textbook(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the square root's trace from the
    eigenvalues of the product (real and non-negative: a product of two PSD matrices)."""
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    roots = np.sqrt(np.clip(np.linalg.eigvals(sa @ sb).real, 0.0, None))
    diff = a.mean(0) - b.mean(0)
    return float(diff @ diff + np.trace(sa) + np.trace(sb) - 2 * roots.sum())


@pytest.mark.parametrize(("n", "m", "d"), [(40, 30, 16), (30, 25, 64), (300, 200, 8)])
def test_matches_the_textbook_formula(n: int, m: int, d: int) -> None:
    """Fewer items than dimensions (the nuclear-norm path) and more (the eigh path)."""
    rng = np.random.default_rng(d)
    a = rng.normal(size=(n, d))
    b = rng.normal(size=(m, d)) @ rng.normal(size=(d, d)) * 0.5 + 1.0
    assert frechet_distance(a, b) == pytest.approx(_textbook(a, b), rel=1e-6)


def test_identical_shifted_and_collapsed_sets() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 8))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = np.arange(8.0)
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift @ shift))
    # A collapsed set (every output the same image, e.g. blank) has no spread: FD = |mu|^2 + tr(S).
    point = np.tile(a.mean(0), (50, 1))
    assert frechet_distance(point, a) == pytest.approx(np.trace(np.cov(a, rowvar=False)))


def test_bad_inputs_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="N >= 2"):
        frechet_distance(np.zeros((1, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="feature sizes differ"):
        frechet_distance(np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(np.full((3, 4), np.nan), np.zeros((3, 4)))
