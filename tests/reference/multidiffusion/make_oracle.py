"""Record MultiDiffusion oracle data from the authors' panorama.py (run outside the project).

Usage (a throwaway venv with diffusers 0.20.1, see README.md):
    python make_oracle.py REFERENCE_DIR OUT_DIR

REFERENCE_DIR holds an unmodified copy of the authors' panorama.py (imported from there); this script contains
none of their code: it builds a stand-in UNet, calls their get_views and their text2panorama loop, and records
what goes in and out.
"""
import json
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as TF

C, CTX_LEN, CTX_DIM = 4, 7, 12


def standin_weights(seed=4321):
    g = torch.Generator().manual_seed(seed)
    return {"conv": torch.randn(C, C, 3, 3, generator=g) * 0.2, "t_gain": torch.randn(C, generator=g),
            "ctx": torch.randn(CTX_DIM, C, generator=g) * 0.3}


def standin_eps(x, t, ctx, w):
    """A deterministic 'noise prediction': 3x3 conv (zero padding) + 0.5·spatial mean + gain·sin(t/150)
    + mean(ctx over tokens)·W_ctx (the same function as in tests/test_baseline_oracles.py, without SDXL's vector)."""
    n = x.shape[0]
    t = torch.as_tensor(t).reshape(-1)[0].float()
    out = TF.conv2d(x, w["conv"], padding=1) + 0.5 * x.mean(dim=(2, 3), keepdim=True)
    out = out + (w["t_gain"] * torch.sin(t / 150.0)).view(1, -1, 1, 1)
    return out + (ctx.mean(dim=1) @ w["ctx"]).view(n, -1, 1, 1)


class StandinUNet(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = w
        self.in_channels = C
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None):
        out = standin_eps(sample, timestep, encoder_hidden_states, self.w)
        self.calls.append({"sample": sample.clone(), "t": int(timestep), "ctx": encoder_hidden_states.clone(),
                           "out": out.clone()})
        return {"sample": out}


def import_reference(ref_dir):
    sys.path.insert(0, str(ref_dir))
    import panorama
    return panorama


def record_get_views(pano):
    cases = []
    # latent (h, w), window, stride; their get_views takes pixels (8x the latent) and divides by 8
    settings = [((64, 64), 64, 8), ((64, 128), 64, 8), ((64, 512), 64, 8), ((64, 75), 64, 8), ((70, 100), 64, 8),
                ((96, 96), 64, 8), ((96, 96), 64, 16), ((128, 256), 128, 8), ((130, 200), 128, 8),
                ((16, 28), 16, 4), ((16, 30), 16, 4), ((21, 37), 16, 5), ((48, 60), 32, 7), ((64, 64), 64, 64),
                ((100, 100), 64, 48), ((40, 80), 64, 8)]
    for (h, w), win, stride in settings:
        views = pano.get_views(h * 8, w * 8, window_size=win, stride=stride)
        cases.append({"latent_hw": [h, w], "window": win, "stride": stride,
                      "views": [list(map(int, v)) for v in views]})
    return {"cases": cases}


def ddim_scheduler():
    from diffusers import DDIMScheduler
    # the config DDIMScheduler.from_pretrained reads from stabilityai/stable-diffusion-2-base/scheduler
    return DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon")


def run_panorama(pano, name, latent_hw, window, stride, num_inference_steps, n_steps_run, seed, guidance_scale=7.5):
    """Their text2panorama on a stand-in UNet, for the first ``n_steps_run`` steps of a ``num_inference_steps``
    DDIM schedule, with get_views called with (window, stride) instead of its defaults (64, 8)."""
    w = standin_weights()
    md = pano.MultiDiffusion.__new__(pano.MultiDiffusion)
    nn.Module.__init__(md)
    md.device, md.sd_version = torch.device("cpu"), "2.0"
    md.unet = StandinUNet(w)
    md.scheduler = ddim_scheduler()
    orig_set_timesteps = md.scheduler.set_timesteps

    def set_timesteps(n, *a, **k):  # run only the first n_steps_run steps of the n-step schedule
        orig_set_timesteps(n, *a, **k)
        md.scheduler.timesteps = md.scheduler.timesteps[:n_steps_run]

    md.scheduler.set_timesteps = set_timesteps
    g = torch.Generator().manual_seed(seed + 1000)
    uncond, cond = torch.randn(1, CTX_LEN, CTX_DIM, generator=g), torch.randn(1, CTX_LEN, CTX_DIM, generator=g)
    md.get_text_embeds = lambda prompt, negative: torch.cat([uncond, cond])
    decoded = []

    def decode_latents(latents):
        decoded.append(latents.clone())
        return torch.full((latents.shape[0], 3, 8, 8), 0.5)

    md.decode_latents = decode_latents
    orig_get_views = pano.get_views
    used_views = []

    def get_views(height, width, window_size=64, stride=8):
        v = orig_get_views(height, width, window_size=window, stride=stride_)
        used_views.append(v)
        return v

    stride_ = stride
    pano.get_views = get_views
    h, wd = latent_hw
    torch.manual_seed(seed)
    x_T = torch.randn((1, C, h, wd))  # what text2panorama draws first after the same seed
    torch.manual_seed(seed)
    md.text2panorama("p", "", height=h * 8, width=wd * 8, num_inference_steps=num_inference_steps,
                     guidance_scale=guidance_scale)
    pano.get_views = orig_get_views
    first = md.unet.calls[0]
    v0 = used_views[0][0]
    assert torch.equal(first["sample"][:1], x_T[:, :, v0[0]:v0[1], v0[2]:v0[3]])  # x_T reproduced
    return {"name": name, "latent_hw": [h, wd], "window": window, "stride": stride,
            "num_inference_steps": num_inference_steps, "steps_run": n_steps_run,
            "timesteps": [int(t) for t in md.scheduler.timesteps], "guidance_scale": guidance_scale, "seed": seed,
            "eta": 0.0, "views": [list(map(int, v)) for v in used_views[0]], "standin": w, "cond": cond,
            "uncond": uncond, "x_T": x_T, "output": decoded[0],
            "alphas_cumprod": md.scheduler.alphas_cumprod.clone(),
            "first_unet_call": {k: first[k] for k in ("sample", "t", "ctx", "out")}}


def main(ref_dir, out_dir):
    torch.set_num_threads(1)
    pano = import_reference(ref_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "get_views.json").write_text(json.dumps(record_get_views(pano), separators=(",", ":")) + "\n")
    runs = [dict(name="step_16x28", latent_hw=(16, 28), window=16, stride=4, num_inference_steps=5, n_steps_run=1,
                 seed=1),
            dict(name="step_16x30_uneven", latent_hw=(16, 30), window=16, stride=4, num_inference_steps=5,
                 n_steps_run=1, seed=2),
            dict(name="run5_20x28", latent_hw=(20, 28), window=16, stride=4, num_inference_steps=5, n_steps_run=5,
                 seed=3)]
    torch.save({r["name"]: run_panorama(pano, **r) for r in runs}, out / "panorama_runs.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
