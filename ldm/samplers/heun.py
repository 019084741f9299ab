"""Heun's second-order method (Karras et al. 2022, Alg. 2 without churn; k-diffusion's ``sample_heun``,
diffusers' ``HeunDiscreteScheduler``): an Euler step to sigma_{i+1}, then the average of the slopes at both ends.
Two model calls per step (one for the last step, an Euler step to sigma = 0), both with the same step index i:
stage 1 at (sigma_i, t_i), stage 2 at (sigma_{i+1}, t_{i+1}) (t_{i+1}: the next step's timestep, fractional
for linspace/karras spacing)."""
from ldm.samplers.kdiff import KDiffusionSampler


def sample_heun(denoise, x, sigmas, loop):
    for i in loop:
        x = loop.pre(x, i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        d = (x - denoise(x, i, i)) / sigma
        dt = float(sigmas[i + 1] - sigmas[i])
        if sigma_next == 0:
            x = x + d * dt
            continue
        x2 = x + d * dt
        d2 = (x2 - denoise(x2, i, i + 1)) / sigma_next
        x = x + (d + d2) * (dt / 2)
    return x


class HeunSampler(KDiffusionSampler):
    name, label, solver = "heun", "Heun", sample_heun
