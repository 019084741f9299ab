"""DPM-Solver++(2M) SDE (midpoint; k-diffusion's ``sample_dpmpp_2m_sde``, diffusers' DPMSolverMultistepScheduler
with ``algorithm_type="sde-dpmsolver++"``): with h = lambda_{i+1} - lambda_i (lambda = -log sigma) and
eta_h = eta * h, x <- (sigma_{i+1}/sigma_i) e^{-eta_h} x - expm1(-h - eta_h) (D_i + (D_i - D_{i-1}) / (2r)) +
sigma_{i+1} sqrt(-expm1(-2 eta_h)) z_i, r = h_{i-1}/h; first order at the first step, the last step returns D.
One model call and (eta > 0) one noise draw z_i per step except the last."""
import math

from ldm.samplers.kdiff import KDiffusionSampler


def sample_dpmpp_2m_sde(denoise, x, sigmas, loop, noise, eta=1.0):
    old, h_last = None, None
    for i in loop:
        x = loop.pre(x, i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, i, i)
        if sigma_next == 0:
            x = d
            continue
        h = math.log(sigma / sigma_next)
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)
        x = x * (sigma_next / sigma * math.exp(-eta_h)) + d * phi
        if old is not None:
            x = x + (d - old) * (0.5 * phi * h / h_last)
        if eta:
            x = x + noise(i) * (sigma_next * math.sqrt(-math.expm1(-2 * eta_h)))
        old, h_last = d, h
    return x


class DPMPP2MSDESampler(KDiffusionSampler):
    name, label, solver, stochastic, multistep_grid = "dpmpp_2m_sde", "DPM++ 2M SDE", sample_dpmpp_2m_sde, True, True
