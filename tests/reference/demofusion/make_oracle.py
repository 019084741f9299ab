"""Record DemoFusion oracle data from the authors' pipeline_demofusion_sdxl.py (run outside the project).

Usage (a throwaway venv with diffusers 0.21.4, see README.md):
    python make_oracle.py REFERENCE_DIR OUT_DIR

REFERENCE_DIR holds an unmodified copy of the authors' pipeline_demofusion_sdxl.py (it is imported from there);
this script contains none of their code: it only builds stand-in modules, calls their functions / pipeline and
records what goes in and out.
"""
import json
import random
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as TF

C, CTX_LEN, CTX_DIM, POOLED = 4, 7, 12, 10


# ------------------------------------------------------------------------------------------------------------------
# the stand-in UNet (the same function is in tests/test_baseline_oracles.py)


def standin_weights(seed=1234):
    g = torch.Generator().manual_seed(seed)
    vec = torch.randn(POOLED + 6, C, generator=g) * 0.1
    vec[POOLED:] *= 0.01  # the six size/crop entries are in pixels
    return {"conv": torch.randn(C, C, 3, 3, generator=g) * 0.2, "t_gain": torch.randn(C, generator=g),
            "ctx": torch.randn(CTX_DIM, C, generator=g) * 0.3, "vec": vec}


def standin_eps(x, t, ctx, vec, w):
    """A deterministic 'noise prediction': 3x3 conv (zero padding) + 0.5·spatial mean + gain·sin(t/150)
    + mean(ctx over tokens)·W_ctx + vec·W_vec (vec: SDXL's pooled text embedding + the six size/crop ids)."""
    n = x.shape[0]
    t = torch.as_tensor(t).reshape(-1)[0].float()
    out = TF.conv2d(x, w["conv"], padding=1) + 0.5 * x.mean(dim=(2, 3), keepdim=True)
    out = out + (w["t_gain"] * torch.sin(t / 150.0)).view(1, -1, 1, 1)
    out = out + (ctx.mean(dim=1) @ w["ctx"]).view(n, -1, 1, 1)
    if vec is not None:
        out = out + (vec @ w["vec"]).view(n, -1, 1, 1)
    return out


# ------------------------------------------------------------------------------------------------------------------
# stand-in modules for the pipeline


class _Module(nn.Module):
    @property
    def device(self):
        return torch.device("cpu")

    @property
    def dtype(self):
        return torch.float32


class StandinUNet(_Module):
    def __init__(self, w, sample_size):
        super().__init__()
        self.w = w
        self.config = SimpleNamespace(sample_size=sample_size, in_channels=C, addition_time_embed_dim=1)
        self.add_embedding = nn.Module()
        self.add_embedding.linear_1 = nn.Linear(POOLED + 6, 1)
        self.calls = []

    def forward(self, sample, timestep, encoder_hidden_states=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, return_dict=True):
        vec = torch.cat([added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]], dim=1)
        out = standin_eps(sample, timestep, encoder_hidden_states, vec, self.w)
        self.calls.append({"sample": sample.clone(), "t": int(timestep), "ctx": encoder_hidden_states.clone(),
                           "vec": vec.clone(), "out": out.clone()})
        return (out,)


class StandinVAE(_Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(block_out_channels=[1, 1, 1, 1], scaling_factor=0.13025, force_upcast=False)
        self.decoded = []

    def decode(self, z, return_dict=True):
        self.decoded.append(z.clone() * self.config.scaling_factor)  # the latent the pipeline decodes
        return (torch.zeros(z.shape[0], 3, 8, 8),)


class StandinTextEncoder2(_Module):
    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(projection_dim=POOLED)


class RecordingRandom:
    """Stands for the module ``random`` inside their module: randint draws from Python's global generator and
    every draw is logged."""

    def __init__(self):
        self.draws = []

    def randint(self, a, b):
        v = random.randint(a, b)
        self.draws.append([a, b, v])
        return v

    def __getattr__(self, name):
        return getattr(random, name)


class RecordingF:
    """Stands for torch.nn.functional inside their module: pad calls (the local and the global path's zero
    padding of the step's latent) are logged."""

    def __init__(self, log):
        self.log = log

    def pad(self, x, pad, *a, **k):
        self.log.append(("pad", tuple(pad), x.clone()))
        return TF.pad(x, pad, *a, **k)

    def __getattr__(self, name):
        return getattr(TF, name)


def ddim_scheduler():
    from diffusers import DDIMScheduler
    s = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    # their loop calls scheduler._init_step_index(t) before each view batch's step (an Euler-scheduler method of
    # later diffusers); DDIMScheduler.step depends on t alone, so the call is a no-op here
    s._init_step_index = lambda t: None
    return s


# ------------------------------------------------------------------------------------------------------------------


def import_reference(ref_dir):
    # their module imports matplotlib.pyplot (only used with show_image=True): an empty stand-in
    mpl = types.ModuleType("matplotlib")
    mpl.pyplot = types.ModuleType("matplotlib.pyplot")
    sys.modules.setdefault("matplotlib", mpl)
    sys.modules.setdefault("matplotlib.pyplot", mpl.pyplot)
    sys.path.insert(0, str(ref_dir))
    import pipeline_demofusion_sdxl as P
    return P


def record_get_views(P):
    rec = RecordingRandom()
    P.random = rec
    this = SimpleNamespace(vae_scale_factor=8)
    cases = []
    # latent sizes (h, w), window, stride; the px sizes passed are 8x the latent sizes
    settings = [((256, 256), 128, 64), ((384, 384), 128, 64), ((256, 512), 128, 64), ((200, 300), 128, 64),
                ((100, 150), 64, 32), ((21, 24), 12, 4), ((32, 36), 12, 4), ((43, 48), 16, 8), ((64, 256), 128, 64),
                ((36, 36), 12, 4), ((24, 48), 12, 5), ((128, 128), 128, 64)]
    for (h, w), win, stride in settings:
        for jitter, seed in ((False, None), (True, 0), (True, 7)):
            if jitter:
                random.seed(seed)
            rec.draws = []
            views = P.DemoFusionSDXLPipeline.get_views(this, h * 8, w * 8, window_size=win, stride=stride,
                                                       random_jitter=jitter)
            cases.append({"latent_hw": [h, w], "window": win, "stride": stride, "random_jitter": jitter,
                          "seed": seed, "jitter_range": (win - stride) // 4 if jitter else 0,
                          "views": [list(map(int, v)) for v in views], "draws": list(rec.draws)})
    P.random = random
    return {"cases": cases}


def record_gaussian(P):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 11, 13, generator=g)
    out = {"input": x, "cases": []}
    for k, sigma in ((1, 0.8), (3, 0.8), (3, 0.8 * 0.0199), (5, 0.8), (5, 0.8 * 0.505), (7, 0.8), (7, 2.5)):
        out["cases"].append({"kernel_size": k, "sigma": sigma,
                             "kernel": P.gaussian_kernel(k, sigma, channels=1)[0, 0].clone(),
                             "output": P.gaussian_filter(x, kernel_size=k, sigma=sigma)})
    return out


def run_pipeline(P, name, height, width, sample_size, stride, steps, seed, per_step=(), global_capture=None):
    """One full run of their __call__ with stand-ins, everything captured."""
    w = standin_weights()
    unet, vae = StandinUNet(w, sample_size), StandinVAE()
    pipe = P.DemoFusionSDXLPipeline(vae=vae, text_encoder=None, text_encoder_2=StandinTextEncoder2(), tokenizer=None,
                                    tokenizer_2=None, unet=unet, scheduler=ddim_scheduler(), add_watermarker=False)
    # check_inputs insists on max(height, width) % 1024 == 0 (SDXL's base size); here the base is
    # sample_size * 8 px and every case has its long side a multiple of that, so the check is skipped
    pipe.check_inputs = lambda *a, **k: None
    g = torch.Generator().manual_seed(seed)
    emb = {"prompt_embeds": torch.randn(1, CTX_LEN, CTX_DIM, generator=g),
           "negative_prompt_embeds": torch.randn(1, CTX_LEN, CTX_DIM, generator=g),
           "pooled_prompt_embeds": torch.randn(1, POOLED, generator=g),
           "negative_pooled_prompt_embeds": torch.randn(1, POOLED, generator=g)}
    scale_num = int(max(height / (sample_size * 8), width / (sample_size * 8)))
    latents = torch.randn(1, C, (height // scale_num) // 8, (width // scale_num) // 8, generator=g)

    log = []
    P.F = RecordingF(log)
    rand = RecordingRandom()
    P.random = rand
    blur_log = []
    orig_gaussian_filter = P.gaussian_filter

    def gaussian_filter(x, kernel_size=3, sigma=1.0):
        out = orig_gaussian_filter(x, kernel_size=kernel_size, sigma=sigma)
        blur_log.append({"input": x.clone(), "kernel_size": kernel_size, "sigma": float(sigma), "output": out.clone()})
        return out

    P.gaussian_filter = gaussian_filter
    views_log = []
    orig_get_views = pipe.get_views

    def get_views(*a, **k):
        v = orig_get_views(*a, **k)
        views_log.append({"args": [a, k], "views": [list(map(int, x)) for x in v]})
        return v

    pipe.get_views = get_views
    add_noise_log = []
    orig_add_noise = pipe.scheduler.add_noise

    def add_noise(original, noise, t):
        add_noise_log.append((original.clone(), noise.clone(), int(t)))
        return orig_add_noise(original, noise, t)

    pipe.scheduler.add_noise = add_noise
    events = []  # per step (all phases): i, t, latent after the step, and the lengths of the logs at that point

    def callback(i, t, lat):
        events.append((i, int(t), lat.clone(), len(log), len(unet.calls), len(rand.draws), len(blur_log)))

    random.seed(seed)  # the window jitter: their get_views draws from Python's global generator
    torch.manual_seed(seed)  # each phase's re-noising draws torch.randn_like from torch's global generator
    pipe(prompt=None, height=height, width=width, num_inference_steps=steps, guidance_scale=5.0,
         latents=latents.clone(), output_type="pt", callback=callback, callback_steps=1, view_batch_size=16,
         multi_decoder=False, stride=stride, cosine_scale_1=3.0, cosine_scale_2=1.0, cosine_scale_3=1.0, sigma=0.8,
         show_image=False, lowvram=False, **{k: v.clone() for k, v in emb.items()})
    P.F, P.random, P.gaussian_filter = TF, random, orig_gaussian_filter

    timesteps = [int(t) for t in pipe.scheduler.timesteps]
    # split the events into phases: `steps` callbacks per phase
    n_phases = len(events) // steps
    assert n_phases == scale_num and len(vae.decoded) == scale_num, (n_phases, scale_num, len(vae.decoded))
    phases = []
    noise_by_phase = [add_noise_log[k * steps][1] for k in range(scale_num - 1)]
    for k in range(scale_num):
        before = events[(k + 1) * steps - 1][2]
        ph = {"scale": k + 1, "latent_hw": list(before.shape[-2:]),
              # the decoded latent: after the re-standardisation to phase 1's mean and std (phases >= 2)
              "output": vae.decoded[k],
              "before_anchor_mean": float(before.mean()), "before_anchor_std": float(before.std())}
        if k > 0:
            ph["noise"] = noise_by_phase[k - 1]
            ph["steps"] = []
            prev = events[k * steps - 1]
            for i in range(steps):
                ev = events[k * steps + i]
                step_log = log[prev[3]:ev[3]]
                pads = [e for e in step_log if e[0] == "pad"]
                local_pad, global_pad = pads[0], pads[1]
                vl = views_log[(k - 1) * steps + i]
                calls = unet.calls[prev[4]:ev[4]]
                blur = blur_log[prev[6]:ev[6]]
                assert len(blur) == 1 and len(pads) == 2
                n_local_calls = -(-len(vl["views"]) // 16)  # view_batch_size 16
                st = {"i": i, "t": ev[1], "views": vl["views"], "jitter_range": local_pad[1][0],
                      "global_pad": list(global_pad[1]), "draws": rand.draws[prev[5]:ev[5]],
                      "blur_kernel_size": blur[0]["kernel_size"], "blur_sigma": blur[0]["sigma"],
                      # the six SDXL size ids of every UNet input (uncond rows; the cond rows are the same)
                      "local_time_ids": [r for c in calls[:n_local_calls] for r in c["vec"][::2, POOLED:].tolist()],
                      "global_time_ids": [r for c in calls[n_local_calls:] for r in c["vec"][::2, POOLED:].tolist()]}
                assert all(torch.equal(c["vec"][::2, POOLED:], c["vec"][1::2, POOLED:]) for c in calls)
                if k + 1 in per_step:
                    st["input"] = local_pad[2]  # the latent entering the step (after the skip residual)
                    st["output"] = ev[2]        # after the step (before any re-standardisation)
                if global_capture == (k + 1, i):
                    st["blur_output"] = blur[0]["output"]  # gaussian_filter of the top/left zero-padded latent
                    # the UNet inputs of the dilated paths (the CFG pairs are equal: cond rows only), in view order
                    st["global_unet_inputs"] = torch.cat([c["sample"][1::2] for c in calls[n_local_calls:]])
                    for c in calls[n_local_calls:]:
                        assert torch.equal(c["sample"][::2], c["sample"][1::2])
                ph["steps"].append(st)
                prev = ev
        phases.append(ph)
    first = unet.calls[0]
    return {
        "name": name, "height": height, "width": width, "sample_size": sample_size, "stride": stride,
        "steps": steps, "seed": seed, "guidance_scale": 5.0, "sigma": 0.8, "cosine_scales": [3.0, 1.0, 1.0],
        "view_batch_size": 16, "eta": 0.0, "timesteps": timesteps, "scale_num": scale_num,
        "alphas_cumprod": pipe.scheduler.alphas_cumprod.clone(), "standin": w, **emb, "x_T": latents,
        "draws": rand.draws, "phases": phases,
        "first_unet_call": {k: first[k] for k in ("sample", "t", "ctx", "vec", "out")},
    }


def cosine_factors(P, steps_list=(4, 50)):
    """c1, c2, c3 of their loop for DDIM timesteps, evaluated with the expression of their loop (float32 tensors)."""
    out = {}
    for steps in steps_list:
        s = ddim_scheduler()
        s.set_timesteps(steps)
        rows = []
        for t in s.timesteps:
            cf = 0.5 * (1 + torch.cos(torch.pi * (s.config.num_train_timesteps - t) / s.config.num_train_timesteps))
            rows.append({"t": int(t), "cosine_factor": float(cf), "c1": float(cf ** 3.0), "c2": float(cf ** 1.0),
                         "c3": float(0.99 * cf ** 1.0 + 1e-2)})
        out[str(steps)] = rows
    return out


def main(ref_dir, out_dir):
    torch.set_num_threads(1)
    P = import_reference(ref_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "get_views.json").write_text(json.dumps(record_get_views(P), indent=None, separators=(",", ":")) + "\n")
    torch.save(record_gaussian(P), out / "gaussian_filter.pt")
    runs = {
        # sample_size 12 latent px = base 96 px; stride 4 -> jitter range 2
        "square_288": dict(height=288, width=288, sample_size=12, stride=4, steps=4, seed=11),
        "wide_192x384": dict(height=192, width=384, sample_size=12, stride=4, steps=4, seed=12),
        "odd_256x288": dict(height=256, width=288, sample_size=12, stride=4, steps=4, seed=13, per_step=(3,),
                            global_capture=(3, 1)),
    }
    for name, kw in runs.items():
        torch.save(run_pipeline(P, name, **kw), out / f"run_{name}.pt")
    (out / "cosine_factors.json").write_text(json.dumps(cosine_factors(P), indent=1) + "\n")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
