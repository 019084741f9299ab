"""Distances between two sets of Inception features: FID (Fréchet) and KID (polynomial-kernel MMD²).

Both are the standard definitions:

* FID (Heusel et al., 2017): fit a Gaussian (mean, unbiased covariance) to each feature set and take
  the Fréchet distance ``|mu1 - mu2|² + tr(S1) + tr(S2) - 2 tr((S1 S2)^½)``.
  ``tr((S1 S2)^½)`` is evaluated as the sum of square roots of the eigenvalues of the symmetric
  PSD matrix ``S1^½ S2 S1^½`` (same spectrum as ``S1 S2``), in float64.  This equals the
  ``scipy.linalg.sqrtm`` route of pytorch-fid/clean-fid wherever that one is well defined and
  stays real-valued when the covariances are rank deficient.
* KID (Bińkowski et al., 2018): the unbiased estimator of the squared MMD with the cubic polynomial
  kernel ``k(x, y) = (x·y / d + 1)³``, averaged over ``num_subsets`` random subsets of
  ``subset_size`` features drawn without replacement from each set (standard: 100 subsets of 1000).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch


class EvalError(ValueError):
    """A user-facing problem with the inputs (too few images, bad folder, ...)."""


class EvalWarning(UserWarning):
    """Something the user should know about the inputs; the result is still computed."""


# --------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------
def feature_statistics(features: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (``N - 1``) of an ``(N, d)`` feature array, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2:
        raise EvalError(f"features must be a 2-d (N, d) array, got shape {f.shape}")
    n, d = f.shape
    if n < 2:
        raise EvalError(f"need at least 2 feature vectors to estimate a covariance, got {n}")
    mu = f.mean(axis=0)
    centred = f - mu
    sigma = centred.T @ centred / (n - 1)
    return mu, sigma


def _sym_sqrt_psd(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((a + a.T) / 2)
    w = np.clip(w, 0.0, None)
    return (v * np.sqrt(w)) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``tr((sigma1 @ sigma2)^½)`` for symmetric PSD matrices."""
    root1 = _sym_sqrt_psd(np.asarray(sigma1, dtype=np.float64))
    m = root1 @ np.asarray(sigma2, dtype=np.float64) @ root1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(ev, 0.0, None)).sum())


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(
            f"incompatible statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt_product(sigma1, sigma2)
    return float(value)


def check_fid_sample_size(n: int, dim: int, name: str = "features") -> None:
    if n < 2:
        raise EvalError(f"FID needs at least 2 images in {name}, got {n}")
    if n <= dim:
        warnings.warn(
            f"{name}: only {n} feature vectors for {dim}-d features, so the covariance is singular; "
            "FID is strongly biased at this size (the paper uses 10k-30k images)",
            EvalWarning,
            stacklevel=4,
        )


def _frechet_lowrank(f1: np.ndarray, f2: np.ndarray) -> float:
    """Exact FID from the features when ``min(N1, N2) <= d`` (covariances of rank < d).

    With centred features ``A_i`` and ``S_i = A_i^T A_i / (N_i - 1)``, the non-zero eigenvalues of
    ``S1 S2`` are those of ``B B^T / c`` with ``B = A1 A2^T`` and ``c = (N1 - 1)(N2 - 1)``, so
    ``tr((S1 S2)^½)`` is the nuclear norm of ``B`` divided by ``sqrt(c)``: an ``N1 x N2`` SVD
    instead of ``d x d`` eigendecompositions.
    """
    a1 = f1 - f1.mean(axis=0)
    a2 = f2 - f2.mean(axis=0)
    n1, n2 = len(f1), len(f2)
    diff = f1.mean(axis=0) - f2.mean(axis=0)
    tr1 = float((a1 * a1).sum()) / (n1 - 1)
    tr2 = float((a2 * a2).sum()) / (n2 - 1)
    nuclear = float(np.linalg.svd(a1 @ a2.T, compute_uv=False).sum())
    return float(diff @ diff + tr1 + tr2 - 2.0 * nuclear / np.sqrt((n1 - 1) * (n2 - 1)))


def fid_from_features(features1: np.ndarray, features2: np.ndarray, method: str = "auto",
                      names: Tuple[str, str] = ("first set", "second set")) -> float:
    """FID between two ``(N, d)`` feature arrays.

    ``method``: "covariance" (d x d statistics), "lowrank" (N1 x N2 SVD, exact as well) or "auto"
    (low-rank when a set has no more vectors than dimensions).
    """
    f1 = np.asarray(features1, dtype=np.float64)
    f2 = np.asarray(features2, dtype=np.float64)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise EvalError(f"feature arrays must be (N, d) with the same d, got {f1.shape} and {f2.shape}")
    check_fid_sample_size(len(f1), f1.shape[1], names[0])
    check_fid_sample_size(len(f2), f2.shape[1], names[1])
    algorithm = method  # the FID computation (not a sampling method)
    if algorithm not in ("auto", "covariance", "lowrank"):
        raise ValueError(f"unknown method {algorithm!r}")
    if algorithm == "lowrank" or (algorithm == "auto" and min(len(f1), len(f2)) <= f1.shape[1]):
        return _frechet_lowrank(f1, f2)
    return frechet_distance(*feature_statistics(f1), *feature_statistics(f2))


# --------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------
def _as_float64(a, device=None) -> torch.Tensor:
    t = a if torch.is_tensor(a) else torch.from_numpy(np.asarray(a))
    return t.to(device if device is not None else t.device, torch.float64)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor, degree: int = 3,
                      gamma: Optional[float] = None, coef0: float = 1.0) -> torch.Tensor:
    """``(gamma * x @ y.T + coef0) ** degree`` with ``gamma = 1 / d`` by default."""
    if gamma is None:
        gamma = 1.0 / x.shape[1]
    return (x @ y.T * gamma + coef0) ** degree


def mmd2_unbiased(x, y, degree: int = 3, gamma: Optional[float] = None, coef0: float = 1.0) -> float:
    """Unbiased MMD² estimate between samples ``x (m, d)`` and ``y (n, d)`` (polynomial kernel).

    Within-set terms exclude the diagonal (U-statistics); the cross term averages all ``m * n`` pairs.
    """
    x = _as_float64(x)
    y = _as_float64(y, x.device)
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise EvalError(f"KID needs at least 2 samples per set, got {m} and {n}")
    kxx = polynomial_kernel(x, x, degree, gamma, coef0)
    kyy = polynomial_kernel(y, y, degree, gamma, coef0)
    kxy = polynomial_kernel(x, y, degree, gamma, coef0)
    term_xx = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    term_yy = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    term_xy = kxy.sum() / (m * n)
    return float(term_xx + term_yy - 2.0 * term_xy)


@dataclass
class KIDResult:
    mean: float
    std: float
    subset_size: int
    num_subsets: int


def kernel_inception_distance(
    features1,
    features2,
    num_subsets: int = 100,
    subset_size: int = 1000,
    seed: int = 0,
    device: Optional[torch.device] = None,
) -> KIDResult:
    """KID: mean (and std) of the unbiased polynomial MMD² over random subsets.

    If either set has fewer than ``subset_size`` features, the subset size is reduced to the smaller
    set size with an :class:`EvalWarning` (as clean-fid and torch-fidelity do).  When both sets are
    then used whole, every subset is the full set and a single evaluation is made.
    """
    f1 = _as_float64(features1)
    f2 = _as_float64(features2, f1.device)
    if f1.ndim != 2 or f2.ndim != 2 or f1.shape[1] != f2.shape[1]:
        raise EvalError(f"feature arrays must be (N, d) with the same d, got {tuple(f1.shape)} and {tuple(f2.shape)}")
    if num_subsets < 1 or subset_size < 2:
        raise EvalError("KID needs num_subsets >= 1 and subset_size >= 2")
    n1, n2 = f1.shape[0], f2.shape[0]
    m = min(subset_size, n1, n2)
    if m < 2:
        raise EvalError(f"KID needs at least 2 images per set, got {n1} and {n2}")
    if m < subset_size:
        warnings.warn(
            f"KID subset size reduced from {subset_size} to {m} because a set has only {min(n1, n2)} "
            "images; values are noisier and not directly comparable to the standard 1000-sample subsets",
            EvalWarning,
            stacklevel=2,
        )
    if device is not None:
        f1, f2 = f1.to(device), f2.to(device)
    if m == n1 == n2:
        value = mmd2_unbiased(f1, f2)
        return KIDResult(mean=value, std=0.0, subset_size=m, num_subsets=1)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(num_subsets):
        i1 = torch.as_tensor(rng.choice(n1, m, replace=False))
        i2 = torch.as_tensor(rng.choice(n2, m, replace=False))
        values.append(mmd2_unbiased(f1[i1.to(f1.device)], f2[i2.to(f2.device)]))
    arr = np.asarray(values)
    return KIDResult(mean=float(arr.mean()), std=float(arr.std()), subset_size=m, num_subsets=num_subsets)


__all__ = [
    "EvalError",
    "EvalWarning",
    "KIDResult",
    "feature_statistics",
    "frechet_distance",
    "trace_sqrt_product",
    "fid_from_features",
    "check_fid_sample_size",
    "polynomial_kernel",
    "mmd2_unbiased",
    "kernel_inception_distance",
]
