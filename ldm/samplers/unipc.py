"""UniPC (Zhao et al. 2023): the UniP-2 predictor with the UniC corrector, B(h) = expm1(-h) ("bh2"), data
prediction, as diffusers' ``UniPCMultistepScheduler`` runs it for SD (``solver_order=2``, ``lower_order_final``).
In lambda = -log sigma, with h = lambda_{i+1} - lambda_i, B = expm1(-h) and r = (lambda_{i-1} - lambda_i) / h:

* predictor: x_{i+1} = (sigma_{i+1}/sigma_i) x_i - B (D_i + rho_p (D_{i-1} - D_i) / r), rho_p = 1/2 (order 2;
  order 1, no second term, at the first step, after a restart at ``start_step`` and at the last step);
* corrector, once D_{i+1} is known: the same formula with (D_{i+1} - D_i) and rho_c solved from UniC's
  conditions for the predictor's order, i.e. x_{i+1} += -B ((rho_c0 - rho_p) D1 + rho_c1 (D_{i+1} - D_i)).

The corrector is added to the latent the next step holds (after ``pre_step``), so a skip residual keeps acting.
One model call per step (the corrector reuses the next step's call)."""
import math

from ldm.samplers.kdiff import KDiffusionSampler


def unic_rhos(h, r):
    """UniC's rho for order 1 (r None: (1/2,)) or 2 (solving [[1, 1], [r, 1]] rho = b, B(h) = expm1(-h))."""
    if r is None:
        return None, 0.5
    hh = -h
    B = math.expm1(hh)
    phi1 = math.expm1(hh) / hh - 1          # h phi_k recursion of the B(h) update, k = 1, 2
    phi2 = phi1 / hh - 0.5
    b1, b2 = phi1 / B, phi2 * 2 / B
    rho0 = (b1 - b2) / (1 - r)
    return rho0, b1 - rho0


def sample_unipc(denoise, x, sigmas, loop):
    prev = None  # the last predictor: (B, D_i, D1 term or None, r or None)
    history = []  # [(lambda, D)] of the steps since the start
    for i in loop:
        x = loop.pre(x, i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, i, i)
        if prev is not None:  # UniC on the latent the last predictor made
            B, d0, d1, r = prev
            rho0, rho1 = unic_rhos(-math.log(sigma) - history[-1][0], r)
            x = x - (d - d0) * (B * rho1) - (0 if d1 is None else d1 * (B * (rho0 - 0.5)))
        history.append((-math.log(sigma), d))
        if sigma_next == 0:
            return d
        h = math.log(sigma / sigma_next)
        B = math.expm1(-h)
        x_new = x * (sigma_next / sigma) - d * B
        d1 = r = None
        if len(history) > 1 and i + 1 < len(sigmas) - 1:  # order 2 (lower order at the last step)
            r = (history[-2][0] - history[-1][0]) / h
            d1 = (history[-2][1] - d) / r
            x_new = x_new - d1 * (B * 0.5)
        prev = (B, d, d1, r)
        x = x_new
    return x


class UniPCSampler(KDiffusionSampler):
    name, label, solver, multistep_grid = "unipc", "UniPC", sample_unipc, True
