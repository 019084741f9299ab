"""Euler ancestral: an Euler step down to sigma_down, then fresh noise of std sigma_up, so that the marginal is
at sigma_{i+1} again (k-diffusion's ``sample_euler_ancestral``, diffusers' ``EulerAncestralDiscreteScheduler``).
``eta`` scales sigma_up (1: full ancestral, 0: Euler). One noise draw per step except the last (sigma -> 0)."""
from ldm.samplers.kdiff import KDiffusionSampler, ancestral_step


def sample_euler_ancestral(denoise, x, sigmas, loop, noise, eta=1.0):
    for i in loop:
        x = loop.pre(x, i)
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        down, up = ancestral_step(sigma, sigma_next, eta)
        d = (x - denoise(x, i, i)) / sigma
        x = x + d * (down - sigma)
        if sigma_next > 0:
            x = x + noise(i) * up
    return x


class EulerAncestralSampler(KDiffusionSampler):
    name, label, solver, stochastic = "euler_a", "Euler a", sample_euler_ancestral, True
