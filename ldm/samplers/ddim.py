"""DDIM sampler (Song et al. 2021) with classifier-free guidance, as in the original LDM code.

Three extension points keep the method code out of the sampler:

* ``guidance``: any callable ``guidance(model, x, t, cond, uncond, scale, step) -> model_output``
  evaluated once per step (``step`` is the 0-based index in sampling order). The default is plain
  classifier-free guidance; ScaleCrafter supplies one that consults its per-step re-dilation plan
  (``ldm/methods/scalecrafter``), FreeScale one that installs its attention and convolution processors.
* ``start_step``: begin at step ``start_step`` of the S-step schedule with ``x_T`` as the latent at that
  step (img2img, and FreeScale's re-noised cascade stages);
* ``pre_step``: ``pre_step(x, step, t) -> x`` applied to the latent before each step's model call
  (FreeScale's and DemoFusion's skip residual).
"""
import numpy as np
import torch
from tqdm import tqdm

from ldm.guidance import classifier_free_guidance
from ldm.modules.diffusionmodules.util import (gaussian_noise, make_ddim_sampling_parameters, make_ddim_timesteps,
                                               noise_like)
from ldm.samplers.base import Sampler, check_finite_run


class DDIMSampler(Sampler):
    """The CompVis sampler (``sample(S, batch_size, shape, ...)``) and the sampler contract (``run``, ``timesteps``,
    ``noised``, ``noise``: ``ldm/samplers/base.py``); ``eta`` is the contract's default for ``run``."""
    name = "ddim"

    def __init__(self, model, schedule="linear", device=None, eta=0.0, **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = device
        self.eta = float(eta)

    # -- the sampler contract ---------------------------------------------------------------------

    def timesteps(self, steps):
        """The discrete timesteps of an S-step run, in sampling order (DDIM's uniform spacing)."""
        return list(reversed(make_ddim_timesteps("uniform", steps, self.ddpm_num_timesteps, False).tolist()))

    def noised(self, x0, steps, step, noise):
        """x0 noised to the latent the sampler holds at ``step`` of an S-step run: q(x_t | x0) at that timestep."""
        t = torch.full((x0.shape[0],), int(self.timesteps(steps)[step]), device=x0.device, dtype=torch.long)
        return self.model.q_sample(x0, t, noise)

    def noise(self, shape, device, generator=None):
        return self._randn(shape, device, generator)

    def run(self, steps, cond, uncond, scale, *, batch_size, shape=None, x_T=None, guidance=None, start_step=0,
            pre_step=None, generator=None, callback=None, disable_progress=True):
        flags = []  # per step: was the latent finite (NonFiniteError names the first step that was not)
        samples, _ = self.sample(S=steps, conditioning=cond, batch_size=batch_size, shape=shape,
                                 verbose=not disable_progress,
                                 unconditional_guidance_scale=scale, unconditional_conditioning=uncond, eta=self.eta,
                                 guidance=guidance, generator=generator, x_T=x_T, start_step=start_step,
                                 pre_step=pre_step, callback=callback, disable_progress=disable_progress,
                                 finite_flags=flags)
        return check_finite_run(samples, flags, steps, self.timesteps(steps), int(start_step))

    def describe(self):
        return {"sampler": "DDIM", "eta": self.eta}

    # -- the CompVis sampler ----------------------------------------------------------------------

    def register_buffer(self, name, attr):
        if isinstance(attr, torch.Tensor):
            device = self.device or self.model.betas.device
            attr = attr.to(device)
        setattr(self, name, attr)

    def make_schedule(self, ddim_num_steps, ddim_discretize="uniform", ddim_eta=0.0, verbose=True):
        if not 0.0 <= float(ddim_eta) <= 1.0:
            raise ValueError(f"DDIM eta must be in [0, 1], got {ddim_eta}: the sigma formula is defined for "
                             "0 <= eta <= 1 (0: deterministic DDIM, 1: DDPM-like ancestral sampling); beyond 1 the "
                             "noise exceeds the step's variance and the result is NaN (black images)")
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps, verbose)
        alphas_cumprod = self.model.alphas_cumprod
        assert alphas_cumprod.shape[0] == self.ddpm_num_timesteps, "alphas have to be defined for each timestep"

        def to_torch(x):
            return x.clone().detach().to(torch.float32).to(self.model.betas.device)

        self.register_buffer("betas", to_torch(self.model.betas))
        self.register_buffer("alphas_cumprod", to_torch(alphas_cumprod))
        self.register_buffer("alphas_cumprod_prev", to_torch(self.model.alphas_cumprod_prev))
        ac = alphas_cumprod.cpu()
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(ac.numpy(), self.ddim_timesteps, ddim_eta,
                                                                    verbose)
        self.register_buffer("ddim_sigmas", torch.as_tensor(sigmas))
        self.register_buffer("ddim_alphas", torch.as_tensor(alphas))
        self.register_buffer("ddim_alphas_prev", alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", np.sqrt(1.0 - alphas))

    @torch.no_grad()
    def sample(self, S, batch_size, shape, conditioning=None, callback=None, img_callback=None, eta=0.0,
               temperature=1.0, noise_dropout=0.0, verbose=True, x_T=None, log_every_t=100,
               unconditional_guidance_scale=1.0, unconditional_conditioning=None, guidance=None,
               generator=None, disable_progress=False, start_step=0, pre_step=None, finite_flags=None, **ignored):
        """Sample ``batch_size`` latents of ``shape`` (C, H, W) in S DDIM steps.

        Returns (samples, intermediates) like the original. ``generator`` (optional) makes the noise
        independent of the global RNG; without it the draws follow the original order
        (x_T first, then one draw per step), so a seed gives the original's noise on CUDA.
        ``generator`` may also be a list with one generator per batch element: element i then draws
        its x_T (when not given) and its per-step noise from ``generator[i]`` alone.
        ``start_step`` > 0 skips the first steps (``x_T`` is then the latent at that step and is required);
        ``pre_step`` see the module doc.
        """
        if not 0 <= int(start_step) < S:
            raise ValueError(f"start_step must be in [0, {S}), got {start_step}")
        if start_step and x_T is None:
            raise ValueError("start_step > 0 needs x_T: the noisy latent at that step")
        if conditioning is not None and isinstance(conditioning, torch.Tensor) and conditioning.shape[0] != batch_size:
            print(f"Warning: Got {conditioning.shape[0]} conditionings but batch-size is {batch_size}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=False)
        size = (batch_size, *shape)
        return self.ddim_sampling(conditioning, size, callback=callback, img_callback=img_callback, x_T=x_T,
                                  log_every_t=log_every_t, temperature=temperature, noise_dropout=noise_dropout,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning, guidance=guidance,
                                  generator=generator, disable_progress=disable_progress or not verbose,
                                  start_step=int(start_step), pre_step=pre_step, finite_flags=finite_flags)

    @torch.no_grad()
    def ddim_sampling(self, cond, shape, x_T=None, callback=None, img_callback=None, log_every_t=100,
                      temperature=1.0, noise_dropout=0.0, unconditional_guidance_scale=1.0,
                      unconditional_conditioning=None, guidance=None, generator=None, disable_progress=False,
                      start_step=0, pre_step=None, finite_flags=None):
        device = self.model.betas.device
        b = shape[0]
        img = self._randn(shape, device, generator) if x_T is None else x_T.to(device)
        time_range = np.flip(self.ddim_timesteps)
        total_steps = self.ddim_timesteps.shape[0]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        for i, step in enumerate(tqdm(time_range[start_step:], desc="DDIM Sampler", total=total_steps - start_step,
                                      disable=disable_progress, leave=False), start=start_step):
            index = total_steps - i - 1
            ts = torch.full((b,), int(step), device=device, dtype=torch.long)
            if pre_step is not None:
                img = pre_step(img, i, ts)
            img, pred_x0 = self.p_sample_ddim(img, cond, ts, index=index, step=i, temperature=temperature,
                                              noise_dropout=noise_dropout,
                                              unconditional_guidance_scale=unconditional_guidance_scale,
                                              unconditional_conditioning=unconditional_conditioning,
                                              guidance=guidance, generator=generator)
            if finite_flags is not None:
                finite_flags.append(torch.isfinite(img).all())
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @staticmethod
    def _randn(shape, device, generator=None):
        """Gaussian noise of ``shape`` (``gaussian_noise``: the global RNG, one generator or one per row)."""
        return gaussian_noise(shape, device, generator)

    @torch.no_grad()
    def p_sample_ddim(self, x, c, t, index, step=None, repeat_noise=False, temperature=1.0, noise_dropout=0.0,
                      unconditional_guidance_scale=1.0, unconditional_conditioning=None, guidance=None,
                      generator=None, **ignored):
        b, device = x.shape[0], x.device
        guide = guidance or classifier_free_guidance
        model_output = guide(self.model, x, t, c, unconditional_conditioning, unconditional_guidance_scale, step)

        if self.model.parameterization == "v":
            e_t = self.model.predict_eps_from_z_and_v(x, t, model_output)
        else:
            e_t = model_output

        # per-step scalars as float32 tensors, as the original fills them
        shape = (b, 1, 1, 1)
        a_t = torch.full(shape, float(self.ddim_alphas[index]), device=device)
        a_prev = torch.full(shape, float(self.ddim_alphas_prev[index]), device=device)
        sigma_t = torch.full(shape, float(self.ddim_sigmas[index]), device=device)
        sqrt_one_minus_at = torch.full(shape, float(self.ddim_sqrt_one_minus_alphas[index]), device=device)

        if self.model.parameterization == "v":
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, model_output)
        else:
            pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()

        dir_xt = (1.0 - a_prev - sigma_t ** 2).sqrt() * e_t
        if generator is None:
            noise = noise_like(x.shape, device, repeat_noise)
        else:
            noise = self._randn(x.shape, device, generator)
        noise = sigma_t * noise * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        x_prev = a_prev.sqrt() * pred_x0 + dir_xt + noise
        return x_prev.to(x.dtype), pred_x0
