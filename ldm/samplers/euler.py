"""Euler's method on the probability-flow ODE dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, Alg. 2
without churn; k-diffusion's ``sample_euler``, diffusers' ``EulerDiscreteScheduler``). One model call per step."""
from ldm.samplers.kdiff import KDiffusionSampler


def sample_euler(denoise, x, sigmas, loop):
    for i in loop:
        x = loop.pre(x, i)
        d = (x - denoise(x, i, i)) / float(sigmas[i])
        x = x + d * float(sigmas[i + 1] - sigmas[i])
    return x


class EulerSampler(KDiffusionSampler):
    name, label, solver = "euler", "Euler", sample_euler
