"""DPM-Solver++(2M) (Lu et al. 2022, multistep second order in x0, data prediction; k-diffusion's
``sample_dpmpp_2m``, diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``,
``solver_order=2``, midpoint, ``lower_order_final``). In lambda = -log sigma with h = lambda_{i+1} - lambda_i:
x <- (sigma_{i+1}/sigma_i) x - expm1(-h) D', D' = D_i + (D_i - D_{i-1}) / (2r), r = h_{i-1}/h; first order at the
first step (and after a restart at ``start_step``) and at the last (to sigma = 0). One model call per step.
``dpmpp_2m_karras``: the same on Karras sigmas."""
import math

from ldm.samplers.kdiff import KDiffusionSampler


def sample_dpmpp_2m(denoise, x, sigmas, loop):
    old, h_last = None, None
    for i in loop:
        x = loop.pre(x, i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = denoise(x, i, i)
        if sigma_next == 0:
            x = d
            continue
        h = math.log(sigma / sigma_next)
        dd = d if old is None else d + (d - old) * (h / (2 * h_last))
        x = x * (sigma_next / sigma) - dd * math.expm1(-h)
        old, h_last = d, h
    return x


class DPMPP2MSampler(KDiffusionSampler):
    name, label, solver, multistep_grid = "dpmpp_2m", "DPM++ 2M", sample_dpmpp_2m, True


class DPMPP2MKarrasSampler(DPMPP2MSampler):
    name, label, default_spacing = "dpmpp_2m_karras", "DPM++ 2M Karras", "karras"
