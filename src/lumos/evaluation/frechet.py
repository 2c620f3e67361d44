"""The Fréchet distance between two sets of features (FID's formula, here on DINO CLS features).

    frechet_distance(generated_feats, reference_feats)   # (N, D), (M, D) -> float, 0 when alike

FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2)), with S the sample covariances
(denominator N - 1). The trace of the matrix square root is computed exactly without `sqrtm`:
with X_a, X_b the centred features, the eigenvalues of S_a S_b are the squared singular values
of X_a X_b^T / sqrt((N - 1)(M - 1)), so tr((S_a S_b)^(1/2)) is that matrix's nuclear norm; when
there are more items than feature dimensions, the same trace is the sum of the square roots of
the eigenvalues of S_a^(1/2) S_b S_a^(1/2) (D x D, symmetric). Both are exact and stay real, and
the first is cheap for the few hundred items of an evaluation, so the bootstrap can recompute it.

Like FID it is biased upwards for small sets: compare values computed on the same number of
items (the evaluation does: every baseline is scored on the same items as the model).
"""

from __future__ import annotations

import numpy as np


def _as_features(x: np.ndarray, what: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"{what} must be (N, D) features with N >= 2, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} holds NaN or infinite values")
    return x


def trace_sqrt_product(xa: np.ndarray, xb: np.ndarray) -> float:
    """tr((S_a S_b)^(1/2)) of the sample covariances of the centred features xa (N, D), xb (M, D)."""
    n, m, d = xa.shape[0], xb.shape[0], xa.shape[1]
    if min(n, m) <= d:
        cross = xa @ xb.T / np.sqrt((n - 1) * (m - 1))  # (N, M)
        return float(np.linalg.svd(cross, compute_uv=False).sum())
    sa = xa.T @ xa / (n - 1)  # (D, D)
    sb = xb.T @ xb / (m - 1)  # (D, D)
    w, v = np.linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T  # S_a^(1/2), (D, D)
    inner = np.linalg.eigvalsh(root_a @ sb @ root_a)  # (D,), real: the product is symmetric
    return float(np.sqrt(np.clip(inner, 0.0, None)).sum())


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance of the Gaussians fitted to features a (N, D) and b (M, D)."""
    a, b = _as_features(a, "a"), _as_features(b, "b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu_a, mu_b = a.mean(0), b.mean(0)  # (D,)
    xa, xb = a - mu_a, b - mu_b  # (N, D), (M, D)
    trace_a = float((xa**2).sum() / (a.shape[0] - 1))
    trace_b = float((xb**2).sum() / (b.shape[0] - 1))
    fd = float(((mu_a - mu_b) ** 2).sum()) + trace_a + trace_b - 2 * trace_sqrt_product(xa, xb)
    # Rounding can leave a tiny negative value for identical sets.
    return max(fd, 0.0)
