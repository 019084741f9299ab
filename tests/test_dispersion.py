"""Dispersed-convolution solver (ldm/unet_hooks/dispersion.py).

The least-squares problem is checked against itself (normal equations,
optimality), against torch's conv2d/interpolate (independent implementation
of the same operators) and against known limits (eta -> 0 on big maps gives
the dilated kernel, which commutes exactly with align-corners upsampling).
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ldm.unet_hooks import dispersion as D

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _fresh_memory_cache():
    D.clear_cache()
    yield
    D.clear_cache()


def dilation_matrix(small=3, large=5, step=2):
    """R that places tap (a, b) of the small kernel at (step a, step b)."""
    R = np.zeros((large * large, small * small))
    for a in range(small):
        for b in range(small):
            R[(step * a) * large + step * b, a * small + b] = 1.0
    return R


def zero_pad_matrix(small=3, large=5):
    """The naive baseline: the small kernel in the middle of a zero large kernel."""
    off = (large - small) // 2
    R = np.zeros((large * large, small * small))
    for a in range(small):
        for b in range(small):
            R[(a + off) * large + b + off, a * small + b] = 1.0
    return R


def interp_t(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=True)


def conv_t(x, k):
    r = k.shape[-1]
    return F.conv2d(x, k, padding=(r - 1) // 2)


# ----------------------------------------------------------------------------
# Operators vs torch
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("n_in,n_out", [(3, 5), (4, 7), (5, 12), (6, 4), (1, 3), (3, 1), (7, 7)])
def test_interp_matrix_matches_torch(n_in, n_out):
    A = D.interp_matrix_1d(n_in, n_out)
    assert A.shape == (n_out, n_in)
    np.testing.assert_allclose(A.sum(1), 1.0, atol=1e-12)  # partition of unity
    h = torch.randn(1, 1, n_in, n_in, dtype=torch.float64)
    ref = interp_t(h, (n_out, n_out))[0, 0].numpy()
    np.testing.assert_allclose(A @ h[0, 0].numpy() @ A.T, ref, atol=1e-12)
    U = D.interp_matrix_2d(n_in, n_out)
    np.testing.assert_allclose(U @ h[0, 0].numpy().ravel(), ref.ravel(), atol=1e-12)


@pytest.mark.parametrize("r,n", [(3, 3), (5, 3), (5, 5), (3, 6), (7, 4)])
def test_conv_matrices_match_torch(r, n):
    h = torch.randn(1, 1, n, n, dtype=torch.float64)
    k = torch.randn(1, 1, r, r, dtype=torch.float64)
    ref = conv_t(h, k)[0, 0].numpy().ravel()
    np.testing.assert_allclose(D.conv_matrix(r, n, h[0, 0].numpy()) @ k.numpy().ravel(), ref, atol=1e-12)
    np.testing.assert_allclose(D.conv_operator(k[0, 0].numpy(), n) @ h.numpy().ravel(), ref, atol=1e-12)


def test_system_blocks_match_torch_on_unit_inputs():
    """Each row block of the system is exactly what torch computes for e_p."""
    n, N, small, large = 3, 5, 3, 5
    t = D.build_terms(small, large, n, 2)
    k = torch.randn(1, 1, small, small, dtype=torch.float64)
    kl = torch.randn(1, 1, large, large, dtype=torch.float64)
    Ms = t["M_struct"].reshape(n * n, N * N, -1)
    Bs = t["B_struct"].reshape(n * n, N * N, -1)
    Mp = t["M_pixel"].reshape(n * n, n * n, -1)
    Bp = t["B_pixel"].reshape(n * n, n * n, -1)
    for p in range(n * n):
        e = torch.zeros(1, 1, n, n, dtype=torch.float64)
        e.view(-1)[p] = 1.0
        np.testing.assert_allclose(Ms[p] @ kl.numpy().ravel(), conv_t(interp_t(e, (N, N)), kl).numpy().ravel(), atol=1e-12)
        np.testing.assert_allclose(Bs[p] @ k.numpy().ravel(), interp_t(conv_t(e, k), (N, N)).numpy().ravel(), atol=1e-12)
        np.testing.assert_allclose(Mp[p] @ kl.numpy().ravel(), conv_t(e, kl).numpy().ravel(), atol=1e-12)
        np.testing.assert_allclose(Bp[p] @ k.numpy().ravel(), conv_t(e, k).numpy().ravel(), atol=1e-12)


# ----------------------------------------------------------------------------
# The least-squares solution
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("params", [
    dict(),
    dict(eta=0.0),
    dict(eta=1.0, feature_size=5),
    dict(small=3, large=7, feature_size=4, scale=3),
    dict(small=1, large=3),
])
def test_normal_equations(params):
    R = D.solve_dispersion(**params)
    M, B = D.build_system(**params)
    assert R.shape == (M.shape[1], B.shape[1])
    # release convention: the pixel rows carry eta itself
    t = D.build_terms(**{k: v for k, v in params.items() if k != "eta"})
    eta = params.get("eta", 0.05)
    np.testing.assert_allclose(M, np.concatenate([t["M_struct"], eta * t["M_pixel"]]), atol=0)
    lhs, rhs = M.T @ M @ R, M.T @ B
    assert np.linalg.norm(lhs - rhs) <= 1e-8 * np.linalg.norm(rhs)


def test_solution_is_the_minimiser():
    R = D.solve_dispersion()
    f0 = D.dispersion_objective(R)
    M, B = D.build_system()
    assert np.isclose(f0, np.sum((M @ R - B) ** 2), rtol=1e-12)  # objective == stacked system
    rng = np.random.default_rng(0)
    for eps in (1e-1, 1e-3):
        for _ in range(5):
            dR = rng.standard_normal(R.shape)
            assert D.dispersion_objective(R + eps * dR) > f0
    # the naive baselines are strictly worse
    assert D.dispersion_objective(zero_pad_matrix()) > f0 + 1e-6
    assert D.dispersion_objective(dilation_matrix()) > f0 + 1e-6


def test_all_ones_response_is_symmetric():
    R = D.solve_dispersion()
    kp = (R @ np.ones(9)).reshape(5, 5)
    for other in (kp.T, kp[::-1], kp[:, ::-1], kp[::-1, ::-1]):
        np.testing.assert_allclose(kp, other, atol=1e-12)
    assert np.all(kp > 0)
    # R commutes with the whole dihedral group for any kernel, not only symmetric ones
    k = np.random.default_rng(1).standard_normal((3, 3))
    disp = lambda x: (R @ x.ravel()).reshape(5, 5)  # noqa: E731
    for op in (np.transpose, np.flipud, np.fliplr, np.rot90):
        np.testing.assert_allclose(disp(op(k)), op(disp(k)), atol=1e-12)


AUTHORS_R = REPO_ROOT / "tests" / "reference" / "scalecrafter_R20to1_new.txt"


def test_default_is_the_authors_released_transform():
    """The defaults reproduce the authors' shipped transforms/R20to1_new.mat (their MATLAB solver's output)."""
    R_authors = np.loadtxt(AUTHORS_R)
    assert R_authors.shape == (25, 9)
    np.testing.assert_allclose(D.solve_dispersion(), R_authors, atol=1e-12)
    np.testing.assert_allclose(D.solve_dispersion(**D.DEFAULTS), R_authors, atol=1e-12)
    # the paper's weighting with the same eta is a different transform (by ~0.11 per entry)
    diff = np.abs(D.solve_dispersion(objective="paper") - R_authors).max()
    assert 0.1 < diff < 0.12, diff


def _torch_system(eta_rows, small=3, large=5, n=3, scale=2):
    """(A, b) built from torch's conv2d/interpolate on unit inputs, pixel rows times ``eta_rows``.

    Independent of the module's matrices: column j of the unknowns is the j-th tap of the large kernel,
    column c of b the response to the c-th small basis kernel.
    """
    N = int(scale * (n - 1)) + 1
    rows_s, rhs_s, rows_p, rhs_p = [], [], [], []
    eye_l = torch.eye(large * large, dtype=torch.float64).reshape(-1, 1, large, large)
    eye_s = torch.eye(small * small, dtype=torch.float64).reshape(-1, 1, small, small)
    for p in range(n * n):
        h = torch.zeros(1, 1, n, n, dtype=torch.float64)
        h.view(-1)[p] = 1
        up = interp_t(h, (N, N))
        rows_s.append(conv_t(up, eye_l).reshape(large * large, -1).T)          # (N², large²)
        rhs_s.append(interp_t(conv_t(h, eye_s), (N, N)).reshape(small * small, -1).T)
        rows_p.append(conv_t(h, eye_l).reshape(large * large, -1).T)
        rhs_p.append(conv_t(h, eye_s).reshape(small * small, -1).T)
    A = torch.cat([torch.cat(rows_s), eta_rows * torch.cat(rows_p)]).numpy()
    b = torch.cat([torch.cat(rhs_s), eta_rows * torch.cat(rhs_p)]).numpy()
    return A, b


@pytest.mark.parametrize("eta", [0.05, 0.3, 1.0])
def test_release_convention_solves_the_row_weighted_normal_equations(eta):
    """Release convention: rows of the pixel block multiplied by eta, A^T A R = A^T b."""
    A, b = _torch_system(eta)
    R = D.solve_dispersion(eta=eta)
    lhs, rhs = A.T @ A @ R, A.T @ b
    assert np.linalg.norm(lhs - rhs) <= 1e-9 * np.linalg.norm(rhs)
    if eta != 1.0:  # and not the paper's sqrt(eta) rows
        A2, b2 = _torch_system(np.sqrt(eta))
        assert np.linalg.norm(A2.T @ A2 @ R - A2.T @ b2) > 1e-4 * np.linalg.norm(A2.T @ b2)


@pytest.mark.parametrize("eta", [0.0025, 0.05, 0.5])
def test_paper_objective_is_release_with_sqrt_eta(eta):
    np.testing.assert_allclose(D.solve_dispersion(eta=eta, objective="paper"),
                               D.solve_dispersion(eta=np.sqrt(eta)), atol=1e-12)
    R = D.solve_dispersion(eta=eta, objective="paper")
    res = D.calibration_residuals(R)
    assert D.dispersion_objective(R, eta=eta, objective="paper") == pytest.approx(res["struct"] + eta * res["pixel"])
    assert D.dispersion_objective(R, eta=eta) == pytest.approx(res["struct"] + eta ** 2 * res["pixel"])


def test_objective_is_validated():
    with pytest.raises(ValueError, match="objective"):
        D.solve_dispersion(objective="matlab")
    with pytest.raises(ValueError, match="eta"):
        D.solve_dispersion(eta=-1)


def test_paper_variant_numbers_are_stable():
    """Pins the paper-weighted solution (3->5, n=3, s=2, eta=0.05) so silent formulation changes fail."""
    R = D.solve_dispersion(objective="paper")
    kp = (R @ np.ones(9)).reshape(5, 5)
    np.testing.assert_allclose(kp[0], [0.5882, 0.3246, 0.5277, 0.3246, 0.5882], atol=1e-4)
    np.testing.assert_allclose(kp[1], [0.3246, 0.2138, 0.3358, 0.2138, 0.3246], atol=1e-4)
    np.testing.assert_allclose(kp[2, 2], 0.4698, atol=1e-4)
    # the centre tap stays exactly at the centre
    np.testing.assert_allclose(R[:, 4], np.eye(25)[12], atol=1e-10)
    res = D.calibration_residuals(R)
    assert res["struct"] == pytest.approx(4.26246, rel=1e-4)
    assert res["pixel"] == pytest.approx(26.9268, rel=1e-4)


def test_structure_only_limit_is_dilation():
    """eta=0 on ever larger maps tends to the dilated kernel (exact away from borders)."""
    Rd = dilation_matrix()
    errs = [np.abs(D.solve_dispersion(feature_size=n, eta=0.0) - Rd).max() for n in (3, 9, 33, 65)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.03, errs


@pytest.mark.parametrize("objective", D.OBJECTIVES)
def test_gram_path_matches_direct(monkeypatch, objective):
    params = dict(feature_size=6, eta=0.3, objective=objective)
    R = D.solve_dispersion(**params)
    res = D.calibration_residuals(R, feature_size=6)
    monkeypatch.setattr(D, "_DIRECT_MAX_ROWS", 0)
    np.testing.assert_allclose(D.solve_dispersion(**params), R, atol=1e-10)
    res2 = D.calibration_residuals(R, feature_size=6)
    for key in res:
        assert res2[key] == pytest.approx(res[key], rel=1e-8)


def test_pixel_term_is_visible():
    Rs = {eta: D.solve_dispersion(eta=eta) for eta in (0.0, 0.05, 1.0, 10.0)}
    assert np.abs(Rs[0.0] - Rs[1.0]).max() > 1e-2
    res = {eta: D.calibration_residuals(R) for eta, R in Rs.items()}
    pix = [res[e]["pixel"] for e in sorted(res)]
    struct = [res[e]["struct"] for e in sorted(res)]
    assert all(a > b for a, b in zip(pix, pix[1:])), pix          # more weight -> better pixel fit
    assert all(a < b for a, b in zip(struct, struct[1:])), struct  # ... at the structure term's cost


def test_dispersed_kernel_beats_zero_padding_on_random_inputs():
    """On bigger random maps (interior only) R k approximates the upsampled output better."""
    torch.manual_seed(0)
    R = D.solve_dispersion()
    n, N = 16, 31
    h = torch.randn(8, 4, n, n, dtype=torch.float64)
    k = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    target = interp_t(conv_t(h, k), (N, N))
    up = interp_t(h, (N, N))
    inner = (slice(None), slice(None), slice(4, N - 4), slice(4, N - 4))
    errs = {}
    for name, RR in (("dispersed", R), ("zero_pad", zero_pad_matrix()), ("dilated", dilation_matrix())):
        out = conv_t(up, D.disperse_kernel(k, RR))
        errs[name] = (torch.linalg.norm((out - target)[inner]) / torch.linalg.norm(target[inner])).item()
    print("relative interior error:", errs)
    assert errs["dispersed"] < 0.8 * errs["zero_pad"], errs
    assert errs["dilated"] < 1e-12, errs  # sanity of the harness: dilation commutes exactly inside


# ----------------------------------------------------------------------------
# Caching
# ----------------------------------------------------------------------------
def test_cache_roundtrip(tmp_path, monkeypatch):
    R = D.get_dispersion_transform(eta=0.05, cache_dir=tmp_path)
    path = tmp_path / D.cache_filename(eta=0.05)
    assert path.is_file()
    np.testing.assert_array_equal(np.load(path), R)
    mtime = path.stat().st_mtime_ns

    D.clear_cache()

    def boom(*a, **k):
        raise AssertionError("solver must not run when the cache file exists")

    monkeypatch.setattr(D, "solve_dispersion", boom)
    R2 = D.get_dispersion_transform(eta=0.05, cache_dir=tmp_path)
    np.testing.assert_array_equal(R2, R)
    assert path.stat().st_mtime_ns == mtime
    # in memory now: even a deleted file is not needed, and callers get copies
    path.unlink()
    R3 = D.get_dispersion_transform(eta=0.05, cache_dir=tmp_path)
    R3[:] = 0
    np.testing.assert_array_equal(D.get_dispersion_transform(eta=0.05, cache_dir=tmp_path), R)


def test_cache_names_and_env(tmp_path, monkeypatch):
    names = {D.cache_filename(**p) for p in (
        dict(), dict(eta=0.5), dict(eta=0.0), dict(scale=2.5), dict(feature_size=4), dict(large=7), dict(small=1),
        dict(objective="paper"))}
    assert len(names) == 8
    monkeypatch.setenv("SCALECRAFTER_CACHE", str(tmp_path))
    assert D.default_cache_dir() == tmp_path / "dispersion"
    D.get_dispersion_transform(eta=0.25)
    assert (tmp_path / "dispersion" / D.cache_filename(eta=0.25)).is_file()


def test_cache_never_crosses_conventions(tmp_path):
    """A file cached for one objective is never served for the other."""
    Rp = D.get_dispersion_transform(objective="paper", cache_dir=tmp_path)
    D.clear_cache()
    Rr = D.get_dispersion_transform(cache_dir=tmp_path)
    np.testing.assert_allclose(Rr, np.loadtxt(AUTHORS_R), atol=1e-12)
    assert np.abs(Rr - Rp).max() > 0.1
    assert len(list(tmp_path.glob("R_*.npy"))) == 2
    # files of the previous format (no convention in the name) are ignored
    old = tmp_path / "R_v1_k3to5_n3_s2_eta0p05.npy"
    np.save(old, Rp)
    D.clear_cache()
    np.testing.assert_allclose(D.get_dispersion_transform(cache_dir=tmp_path), Rr, atol=0)


def test_corrupt_cache_is_recomputed(tmp_path):
    path = tmp_path / D.cache_filename()
    path.write_bytes(b"not an npy file")
    R = D.get_dispersion_transform(cache_dir=tmp_path)
    np.testing.assert_allclose(R, D.solve_dispersion())
    np.testing.assert_array_equal(np.load(path), R)


# ----------------------------------------------------------------------------
# Applying R
# ----------------------------------------------------------------------------
def test_disperse_kernel_numpy():
    R = D.solve_dispersion()
    w = np.random.default_rng(0).standard_normal((4, 2, 3, 3)).astype(np.float32)
    out = D.disperse_kernel(w, R)
    assert out.shape == (4, 2, 5, 5) and out.dtype == np.float32
    np.testing.assert_allclose(out[1, 0], (R @ w[1, 0].astype(np.float64).ravel()).reshape(5, 5), rtol=1e-5, atol=1e-6)
    assert D.disperse_kernel(np.ones((3, 3), dtype=np.int64), R).dtype == np.float64
    with pytest.raises(ValueError):
        D.disperse_kernel(np.zeros((2, 2, 5, 5)), R)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_disperse_kernel_torch(dtype):
    R = D.solve_dispersion()
    w = torch.randn(4, 2, 3, 3).to(dtype)
    out = D.disperse_kernel(w, R)
    assert isinstance(out, torch.Tensor)
    assert out.shape == (4, 2, 5, 5) and out.dtype == dtype and out.device == w.device
    ref = D.disperse_kernel(w.double().numpy(), R)
    tol = 1e-5 if dtype in (torch.float32, torch.float64) else 3e-2
    np.testing.assert_allclose(out.double().numpy(), ref, rtol=tol, atol=tol)
    # torch R works too, and gradients flow
    wg = torch.randn(3, 1, 3, 3, requires_grad=True)
    D.disperse_kernel(wg, torch.as_tensor(R)).sum().backward()
    assert wg.grad is not None and wg.grad.shape == wg.shape


def test_module_does_not_import_torch():
    code = "import sys; import ldm.unet_hooks.dispersion as d; d.solve_dispersion(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli(tmp_path):
    out = tmp_path / "R.txt"
    proc = subprocess.run(
        [sys.executable, "scripts/solve_dispersion.py", "--eta", "0.05", "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert "structure-level residual" in proc.stdout and "pixel-level residual" in proc.stdout
    assert "objective=release" in proc.stdout
    np.testing.assert_allclose(np.loadtxt(out), np.loadtxt(AUTHORS_R), atol=1e-14)
    out_p = tmp_path / "Rp.npy"
    subprocess.run([sys.executable, "scripts/solve_dispersion.py", "--objective", "paper", "--out", str(out_p)],
                   cwd=REPO_ROOT, capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": ""})
    np.testing.assert_allclose(np.load(out_p), D.solve_dispersion(eta=np.sqrt(0.05)), atol=1e-12)


@pytest.mark.parametrize("argv,needle", [
    (["--eta", "-1"], "--eta"), (["--small", "4"], "--small"), (["--large", "3", "--small", "5"], "--large"),
    (["--objective", "matlab"], "--objective"), (["--out", "R.png"], "--out"), (["--scale", "0"], "--scale"),
    (["--feature_size", "0"], "--feature_size"),
])
def test_cli_argument_errors_are_argparse_errors(tmp_path, argv, needle):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/solve_dispersion.py"), *argv],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and needle in proc.stderr, proc.stderr
    assert "usage:" in proc.stderr
    assert not (tmp_path / "R.png").exists()
