"""Dispersed convolution: turn a pretrained small kernel into a larger one.

ScaleCrafter (He et al., ICLR 2024) enlarges the receptive field of a pretrained
``r x r`` convolution by mapping its kernel ``k`` to an ``r' x r'`` kernel
``k' = R k``.  The matrix ``R`` (``r'^2 x r^2``) depends neither on the weights
nor on the features, so it is solved once, in closed form, by linear least
squares over two calibrations:

* structure level: the large kernel on the bilinearly upsampled input should
  match the upsampled output of the small kernel,
  ``interp(f_k(h)) ~ f_{k'}(interp(h))``;
* pixel level (weight ``eta``): on the original input the large kernel should
  behave like the small one, ``f_k(h) ~ f_{k'}(h)``.

How ``eta`` weights the pixel level (``objective``):

* ``"release"`` (default): the pixel-level *rows* are multiplied by ``eta``, so
  the minimised objective is ``||struct||^2 + eta^2 ||pixel||^2``.  This is what
  the authors' MATLAB solver does (``disperse/kernel_disperse.m`` stacks
  ``[structLHS; eta * pixelLHS]``), and with the released parameters (3 -> 5,
  input 3, scale 2, eta 0.05) it reproduces their shipped transform
  ``transforms/R20to1_new.mat`` to 1e-15 (``tests/test_dispersion.py``).
* ``"paper"``: the objective as the paper's equation writes it,
  ``||struct||^2 + eta ||pixel||^2`` (rows multiplied by ``sqrt(eta)``).

The two agree when the paper's ``eta`` equals the release's ``eta**2``; with
``eta = 0.05`` they differ by up to 0.11 per entry of ``R``.

Everything is linear in the input ``h`` and in the kernel, so evaluating both
sides on every unit input ``h = e_p`` of an ``n x n`` feature map gives one
equation per (input position, output position) that holds for all kernels at
once.  Stacking them yields ``M R ~ B`` (see :func:`build_system`).

Conventions (those of ``torch.nn.functional.conv2d`` / ``interpolate``):
cross-correlation, zero "same" padding ``(r - 1) / 2``, bilinear interpolation
with ``align_corners=True``, kernels and feature maps flattened row-major.

Only numpy is needed here; :func:`disperse_kernel` also accepts torch tensors
without importing torch itself.
"""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np

__all__ = [
    "DEFAULTS",
    "OBJECTIVES",
    "pixel_row_weight",
    "interp_matrix_1d",
    "interp_matrix_2d",
    "upsampled_size",
    "conv_tensor",
    "conv_matrix",
    "conv_operator",
    "build_terms",
    "build_system",
    "solve_dispersion",
    "calibration_residuals",
    "dispersion_objective",
    "get_dispersion_transform",
    "default_cache_dir",
    "cache_filename",
    "clear_cache",
    "disperse_kernel",
]

# Bump when the formulation changes so stale cache files are not reused.
_FORMAT_VERSION = 2

# The authors' released transform: kernel_disperse(3, 5, 3, 2, 0.05) with rows weighted by eta.
DEFAULTS = dict(small=3, large=5, feature_size=3, scale=2.0, eta=0.05, objective="release")
OBJECTIVES = ("release", "paper")


def pixel_row_weight(eta: float, objective: str = "release") -> float:
    """Factor on the pixel-level rows: ``eta`` (release) or ``sqrt(eta)`` (paper); see the module doc."""
    eta = float(eta)
    if not eta >= 0:  # also rejects NaN
        raise ValueError(f"eta must be non-negative, got {eta}")
    if objective == "release":
        return eta
    if objective == "paper":
        return float(np.sqrt(eta))
    raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")


# ----------------------------------------------------------------------------
# Linear building blocks
# ----------------------------------------------------------------------------
def interp_matrix_1d(n_in: int, n_out: int) -> np.ndarray:
    """1-D linear interpolation matrix ``A`` (``n_out x n_in``), align_corners=True.

    Output sample ``i`` sits at source coordinate ``i (n_in - 1) / (n_out - 1)``
    (the end points of both grids coincide) and is the linear blend of its two
    neighbouring input samples.  With ``n_out == 1`` the source coordinate is
    0, as in torch.
    """
    n_in, n_out = int(n_in), int(n_out)
    if n_in < 1 or n_out < 1:
        raise ValueError(f"sizes must be positive, got n_in={n_in}, n_out={n_out}")
    A = np.zeros((n_out, n_in), dtype=np.float64)
    ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    for i in range(n_out):
        x = i * ratio
        lo = min(int(np.floor(x)), n_in - 1)
        hi = min(lo + 1, n_in - 1)
        w = x - lo
        A[i, lo] += 1.0 - w
        A[i, hi] += w
    return A


def interp_matrix_2d(n_in: int, n_out: int) -> np.ndarray:
    """Bilinear (align_corners=True) map of a flattened square map: ``kron(A, A)``.

    Bilinear interpolation is separable, so on row-major flattened maps it is
    the Kronecker product of the 1-D matrices for rows and columns.
    """
    A = interp_matrix_1d(n_in, n_out)
    return np.kron(A, A)


def upsampled_size(feature_size: int, scale: float) -> int:
    """Size of the upsampled map, ``s (n - 1) + 1``, so the corner grids align."""
    return int(round(float(scale) * (int(feature_size) - 1))) + 1


def _check_odd(kernel_size: int, name: str = "kernel_size") -> int:
    kernel_size = int(kernel_size)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer for 'same' padding, got {kernel_size}")
    return kernel_size


def conv_tensor(kernel_size: int, n: int) -> np.ndarray:
    """Bilinear form of a 'same' 2-D cross-correlation on an ``n x n`` map.

    Returns ``T`` of shape ``(n^2, n^2, r^2)`` with
    ``out[o] = sum_{p, j} T[o, p, j] h[p] k[j]``: ``T[o, p, j] = 1`` iff input
    pixel ``p`` is seen by kernel tap ``j`` when producing output ``o``, i.e.
    ``p = o + j - (r - 1) / 2`` per axis (zero padding drops the rest).
    """
    r = _check_odd(kernel_size)
    n = int(n)
    t1 = _conv_tensor_1d(r, n)
    return _outer_2d(t1, t1).reshape(n * n, n * n, r * r)


def _conv_tensor_1d(r: int, n: int) -> np.ndarray:
    """1-D pattern ``t[o, p, j] = [p == o + j - (r - 1) / 2]``."""
    c = (r - 1) // 2
    o = np.arange(n)[:, None, None]
    p = np.arange(n)[None, :, None]
    j = np.arange(r)[None, None, :]
    return (p == o + j - c).astype(np.float64)


def _outer_2d(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Separable 3-index product ``z[(a,b),(c,d),(i,j)] = x[a,c,i] y[b,d,j]``.

    Every block of the system factorises over the two image axes (bilinear
    interpolation and zero padding both act per axis), so the 2-D objects
    are built from 1-D ones without materialising huge dense tensors.
    """
    a, c, i = x.shape
    b, d, j = y.shape
    return np.einsum("aci,bdj->abcdij", x, y).reshape(a * b, c * d, i * j)


def conv_matrix(kernel_size: int, n: int, h: np.ndarray) -> np.ndarray:
    """Matrix ``C(h)`` (``n^2 x r^2``) with ``conv(h, k).ravel() = C(h) @ k.ravel()``.

    The convolution seen as a linear map of the kernel for a fixed input,
    which is the form least squares over kernels needs.
    """
    h = np.asarray(h, dtype=np.float64)
    if h.shape not in ((n, n), (n * n,)):
        raise ValueError(f"h must have shape ({n}, {n}), got {h.shape}")
    return np.einsum("opj,p->oj", conv_tensor(kernel_size, n), h.reshape(-1))


def conv_operator(kernel: np.ndarray, n: int) -> np.ndarray:
    """Matrix ``K`` (``n^2 x n^2``) with ``conv(h, kernel).ravel() = K @ h.ravel()``."""
    kernel = np.asarray(kernel, dtype=np.float64)
    if kernel.ndim != 2 or kernel.shape[0] != kernel.shape[1]:
        raise ValueError(f"kernel must be square 2-D, got shape {kernel.shape}")
    return np.einsum("opj,j->op", conv_tensor(kernel.shape[0], n), kernel.reshape(-1))


# ----------------------------------------------------------------------------
# Least-squares system
# ----------------------------------------------------------------------------
def _axis_factors(small: int, large: int, feature_size: int, scale: float) -> Dict[str, np.ndarray]:
    """Per-axis (1-D) factors of the four blocks, each indexed ``[p, o, j]``.

    Bilinear interpolation and zero-padded convolution both act on each image
    axis separately, so every 2-D block is the outer product of a 1-D factor
    with itself (see :func:`_outer_2d`).
    """
    small = _check_odd(small, "small")
    large = _check_odd(large, "large")
    n = int(feature_size)
    if n < 1:
        raise ValueError(f"feature_size must be positive, got {n}")
    N = upsampled_size(n, scale)
    A = interp_matrix_1d(n, N)                       # (N, n)
    ts = _conv_tensor_1d(small, n)                   # (n, n, r)   [o, p, j]
    tl_n = _conv_tensor_1d(large, n)                 # (n, n, r')
    tl_N = _conv_tensor_1d(large, N)                 # (N, N, r')
    return dict(
        # Structure level. The upsampled unit input is column p of A, so
        # C_large(A e_p)[o, j'] = sum_q tl_N[o, q, j'] A[q, p].
        M_struct=np.einsum("oqj,qp->poj", tl_N, A),  # (n, N, r')
        # C_small(e_p)[m, j] = ts[m, p, j], then the output is upsampled by A.
        B_struct=np.einsum("om,mpj->poj", A, ts),    # (n, N, r)
        # Pixel level: C(e_p)[o, j] = t[o, p, j].
        M_pixel=tl_n.transpose(1, 0, 2),             # (n, n, r')
        B_pixel=ts.transpose(1, 0, 2),               # (n, n, r)
    )


def build_terms(
    small: int = 3,
    large: int = 5,
    feature_size: int = 3,
    scale: float = 2.0,
) -> Dict[str, np.ndarray]:
    """Unweighted blocks of both calibrations, ``M_x R ~ B_x``.

    For each unit input ``e_p`` (``p`` over the ``n x n`` map):

    * structure rows ``(p, o)``, ``o`` over the ``N x N`` upsampled map:
      ``M_struct = C_large(U e_p)`` and ``B_struct = U C_small(e_p)``;
    * pixel rows ``(p, o)``, ``o`` over the ``n x n`` map:
      ``M_pixel = C_large(e_p)`` and ``B_pixel = C_small(e_p)``,

    where ``U`` is the 2-D interpolation matrix and ``C_r(h)`` is
    :func:`conv_matrix`.  Column ``j`` of ``B`` is the response to the ``j``-th
    basis kernel, so one solve gives all of ``R``.  (Rows are ordered
    ``(p_row, p_col, o_row, o_col)``.)
    """
    f = _axis_factors(small, large, feature_size, scale)
    return {name: _outer_2d(x, x).reshape(-1, x.shape[-1] ** 2) for name, x in f.items()}


def _gram_terms(small, large, feature_size, scale) -> Dict[str, np.ndarray]:
    """``M_x^T M_x``, ``M_x^T B_x`` and ``||B_x||^2`` from the 1-D factors.

    The 2-D blocks are outer products of 1-D factors, hence their Gram
    matrices are Kronecker products of the 1-D Gram matrices; this solves big
    feature maps without building systems of ``n^2 N^2`` rows.
    """
    f = _axis_factors(small, large, feature_size, scale)
    out = {}
    for name in ("struct", "pixel"):
        m = f[f"M_{name}"].reshape(-1, f[f"M_{name}"].shape[-1])
        b = f[f"B_{name}"].reshape(-1, f[f"B_{name}"].shape[-1])
        g, c = m.T @ m, m.T @ b
        out[f"G_{name}"] = np.kron(g, g)
        out[f"C_{name}"] = np.kron(c, c)
        out[f"bb_{name}"] = float(np.sum(b * b)) ** 2
    return out


def _num_rows(feature_size, scale) -> int:
    n = int(feature_size)
    N = upsampled_size(n, scale)
    return n * n * (N * N + n * n)


# Above this many rows, solve through the (Kronecker) normal equations.
_DIRECT_MAX_ROWS = 100_000


def build_system(
    small: int = 3,
    large: int = 5,
    feature_size: int = 3,
    scale: float = 2.0,
    eta: float = 0.05,
    objective: str = "release",
) -> Tuple[np.ndarray, np.ndarray]:
    """Stacked system ``(M, B)``: structure rows, then pixel rows times :func:`pixel_row_weight`.

    ``||M R - B||^2`` equals the full objective, so the solution satisfies the
    normal equations ``M^T M R = M^T B``.
    """
    w = pixel_row_weight(eta, objective)
    t = build_terms(small, large, feature_size, scale)
    M = np.concatenate([t["M_struct"], w * t["M_pixel"]], axis=0)
    B = np.concatenate([t["B_struct"], w * t["B_pixel"]], axis=0)
    return M, B


def solve_dispersion(
    small: int = 3,
    large: int = 5,
    feature_size: int = 3,
    scale: float = 2.0,
    eta: float = 0.05,
    objective: str = "release",
) -> np.ndarray:
    """Closed-form least-squares dispersion matrix ``R`` of shape ``(large^2, small^2)``.

    ``objective="release"`` (default) weights the pixel rows by ``eta`` as the
    authors' solver does, and the defaults give their shipped ``R20to1_new.mat``;
    ``objective="paper"`` minimises the paper's ``||struct||^2 + eta ||pixel||^2``.

    Solved with an SVD-based ``lstsq`` on ``M`` (better conditioned than
    forming ``M^T M``; very large feature maps fall back to the Kronecker
    normal equations, see :func:`_gram_terms`); if the system is rank deficient (e.g. ``eta = 0`` on
    a tiny map) this is the minimum-norm solution, which keeps the dihedral
    symmetry of the problem.  Use as
    ``k' = (R @ k.reshape(-1)).reshape(large, large)``.
    """
    if int(large) < int(small):
        raise ValueError(f"large ({large}) must be >= small ({small})")
    if _num_rows(feature_size, scale) <= _DIRECT_MAX_ROWS:
        M, B = build_system(small, large, feature_size, scale, eta, objective)
        R, *_ = np.linalg.lstsq(M, B, rcond=None)
        return R
    w2 = pixel_row_weight(eta, objective) ** 2
    g = _gram_terms(small, large, feature_size, scale)
    G = g["G_struct"] + w2 * g["G_pixel"]
    C = g["C_struct"] + w2 * g["C_pixel"]
    R, *_ = np.linalg.lstsq(G, C, rcond=None)
    return R


def calibration_residuals(R: np.ndarray, small=3, large=5, feature_size=3, scale=2.0) -> Dict[str, float]:
    """Unweighted squared residuals of both calibrations, and their relative sizes.

    ``struct``/``pixel`` are ``||M_x R - B_x||_F^2``; ``*_rel`` divide the
    residual norm by ``||B_x||_F`` (0 = exact, 1 = no better than ``R = 0``).
    Large maps use the Gram form ``tr(R^T G R) - 2 tr(R^T C) + ||B||^2``.
    """
    R = np.asarray(R, dtype=np.float64)
    out = {}
    if _num_rows(feature_size, scale) <= _DIRECT_MAX_ROWS:
        t = build_terms(small, large, feature_size, scale)
        for name in ("struct", "pixel"):
            res = t[f"M_{name}"] @ R - t[f"B_{name}"]
            out[name] = float(np.sum(res ** 2))
            out[f"{name}_rel"] = float(np.sqrt(out[name] / np.sum(t[f"B_{name}"] ** 2)))
        return out
    g = _gram_terms(small, large, feature_size, scale)
    for name in ("struct", "pixel"):
        val = np.sum(R * (g[f"G_{name}"] @ R)) - 2.0 * np.sum(R * g[f"C_{name}"]) + g[f"bb_{name}"]
        out[name] = float(max(val, 0.0))
        out[f"{name}_rel"] = float(np.sqrt(out[name] / g[f"bb_{name}"]))
    return out


def dispersion_objective(R: np.ndarray, small=3, large=5, feature_size=3, scale=2.0, eta=0.05,
                         objective="release") -> float:
    """The minimised objective at ``R``: ``||struct||^2 + w^2 ||pixel||^2``, ``w`` from :func:`pixel_row_weight`."""
    res = calibration_residuals(R, small, large, feature_size, scale)
    return res["struct"] + pixel_row_weight(eta, objective) ** 2 * res["pixel"]


# ----------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------
_MEMORY_CACHE: Dict[tuple, np.ndarray] = {}


def default_cache_dir() -> Path:
    """``$SCALECRAFTER_CACHE/dispersion`` if the variable is set, else ``~/.cache/scalecrafter/dispersion``."""
    root = os.environ.get("SCALECRAFTER_CACHE")
    if root:
        return Path(root).expanduser() / "dispersion"
    return Path("~/.cache/scalecrafter/dispersion").expanduser()


def _fmt(x: float) -> str:
    # repr-level precision, file-name safe ('.' -> 'p', '-' -> 'm').
    return format(float(x), ".12g").replace(".", "p").replace("-", "m").replace("+", "")


def _key(small, large, feature_size, scale, eta, objective) -> tuple:
    pixel_row_weight(eta, objective)  # validates both
    return (int(small), int(large), int(feature_size), float(scale), float(eta), str(objective))


def cache_filename(small=3, large=5, feature_size=3, scale=2.0, eta=0.05, objective="release") -> str:
    """File name encoding every parameter, the objective convention and the format version."""
    s, l, n, sc, e, obj = _key(small, large, feature_size, scale, eta, objective)
    return f"R_v{_FORMAT_VERSION}_{obj}_k{s}to{l}_n{n}_s{_fmt(sc)}_eta{_fmt(e)}.npy"


def clear_cache() -> None:
    """Forget in-memory results (files on disk are kept)."""
    _MEMORY_CACHE.clear()


def get_dispersion_transform(
    small: int = 3,
    large: int = 5,
    feature_size: int = 3,
    scale: float = 2.0,
    eta: float = 0.05,
    objective: str = "release",
    cache_dir: Optional[Union[str, os.PathLike]] = None,
) -> np.ndarray:
    """Cached :func:`solve_dispersion`: memory first, then ``cache_dir`` on disk, then solve.

    The solve is cheap but runs at model-patching time for many layers and
    processes; the disk file also lets runs pin the exact ``R`` they used.
    Returns a fresh copy so callers cannot corrupt the cache.  An unwritable
    cache directory only produces a warning.
    """
    key = _key(small, large, feature_size, scale, eta, objective)
    if key in _MEMORY_CACHE:
        return _MEMORY_CACHE[key].copy()

    shape = (key[1] ** 2, key[0] ** 2)
    directory = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = directory / cache_filename(*key)
    R = None
    if path.is_file():
        try:
            loaded = np.load(path, allow_pickle=False)
            if loaded.shape == shape and np.all(np.isfinite(loaded)):
                R = loaded.astype(np.float64)
        except (OSError, ValueError):
            R = None  # unreadable/corrupt: recompute and overwrite
    if R is None:
        R = solve_dispersion(*key)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            # Write to a temporary file and rename, so concurrent readers never
            # see a half-written array.
            fd = os.open(tmp := str(directory / f".tmp_{os.urandom(8).hex()}.npy"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as f:
                    np.save(f, R)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.unlink(tmp)
                raise
        except OSError as exc:
            warnings.warn(f"could not write dispersion cache {path}: {exc}")
    _MEMORY_CACHE[key] = R
    return R.copy()


# ----------------------------------------------------------------------------
# Applying R to weights
# ----------------------------------------------------------------------------
def _is_torch_tensor(x) -> bool:
    # No torch import: if torch was never imported, x cannot be a tensor.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def disperse_kernel(weight, R):
    """Map conv weights ``(..., r, r)`` (typically ``(out, in, r, r)``) to ``(..., r', r')``.

    ``k' = R k`` on every row-major flattened kernel.  numpy arrays keep
    their floating dtype (integers become float64); torch tensors keep dtype
    and device and stay differentiable (half/bfloat16 are computed in float32
    and cast back).
    """
    if _is_torch_tensor(R):
        R_np = None
        R_shape = tuple(R.shape)
    else:
        R_np = np.asarray(R, dtype=np.float64)
        R_shape = R_np.shape
    if len(R_shape) != 2:
        raise ValueError(f"R must be 2-D, got shape {R_shape}")
    small = int(round(np.sqrt(R_shape[1])))
    large = int(round(np.sqrt(R_shape[0])))
    if small * small != R_shape[1] or large * large != R_shape[0]:
        raise ValueError(f"R shape {R_shape} is not (large^2, small^2)")
    if tuple(weight.shape[-2:]) != (small, small):
        raise ValueError(f"weight kernel shape {tuple(weight.shape[-2:])} does not match R (expects {small}x{small})")
    lead = tuple(weight.shape[:-2])

    if _is_torch_tensor(weight):
        import torch  # already imported by the caller

        if weight.is_floating_point():
            out_dtype = weight.dtype
            compute = out_dtype if out_dtype in (torch.float32, torch.float64) else torch.float32
        else:  # integer weights: promote like numpy does
            out_dtype = compute = torch.get_default_dtype()
        Rt = torch.as_tensor(R if R_np is None else R_np, device=weight.device).to(compute)
        flat = weight.reshape(*lead, small * small).to(compute)
        out = flat @ Rt.transpose(0, 1)
        return out.reshape(*lead, large, large).to(out_dtype)

    if R_np is None:  # torch R with numpy weight
        R_np = R.detach().cpu().double().numpy()
    w = np.asarray(weight)
    out_dtype = w.dtype if np.issubdtype(w.dtype, np.inexact) else np.float64
    flat = w.reshape(lead + (small * small,))
    out = flat @ R_np.T
    return out.reshape(lead + (large, large)).astype(out_dtype, copy=False)
