"""Provenance of oracle_tiny.pt: the authors' FouriScale (LeonHLJ/FouriScale) run on a tiny diffusers UNet with
SD 1.5's block structure and random weights. See README.md in this folder.

NOT part of the test suite and never imported by it: it needs diffusers and the release, which are not
dependencies of this repository. Run it from a throw-away environment, e.g.

    python -m venv --system-site-packages /tmp/venv_fs
    /tmp/venv_fs/bin/pip install diffusers==0.20.2 transformers==4.27.4 "huggingface_hub<0.26" accelerate==0.21.0
    git --git-dir <bare clone of LeonHLJ/FouriScale> archive 6fb392eae53a5c1b67e6072f8a36cdae7b970258 \
        -- '*.py' '*.txt' '*.yaml' | tar -x -C /tmp/fs_git    # (the snapshot used lacks some image blobs)
    /tmp/venv_fs/bin/python tests/reference/fouriscale/make_oracle.py --release /tmp/fs_git

It reuses the HiDiffusion oracle's tiny model and helpers (tests/reference/hidiffusion/make_oracle.py: the
diffusers UNet definition, the exactly representable 4-bit weights, the diffusers -> LDM key mapping), with one
change: diffusers ``sample_size`` 16 instead of 12 (the weights do not depend on it: they are the HiDiffusion
oracle's, bit for bit). With 12 the deepest level
of a 2x latent is 3x3, an odd FFT size, on which the release's mask construction fails (its known bug 3).

What it does, per case (latent size):
1. the release's text2image.py machinery on a StableDiffusionPipeline built from the tiny UNet: its
   ``TrainingFreeAttnProcessor`` on every attention layer (its aux.list_layers, as its main() installs them),
   and its ``pipeline_processor`` forward (the per-step ``FouriConvProcessor`` on the listed convs, the
   [uncond, cond, cond] batch, the guidance combine), called with fixed contexts (prompt_embeds /
   negative_prompt_embeds) and a fixed first latent;
2. the scheduler's ``step`` is replaced by a recorder that stores the guided noise prediction the pipeline hands
   it and returns the next *prescribed* latent (float16-exact random values), so every step's input is fixed and
   independent of the DDIM update; a forward hook on the UNet stores the raw three-branch output of each step;
3. the run is made in float64 (stored) and in float32 (only its distance to the float64 run is stored).
   The release's conv processor filters in float32 whatever the input dtype, so the "float64" run has float32
   FFTs in it; its float32-vs-float64 distance is stored per step.

Layer list: the release's assets/layer_settings/sd1.5.txt (the tiny UNet has SD 1.5's module names). Base sizes:
the release's assets/base_settings/sd1.5.txt scaled by 16/64 (the training latent 64 of SD 1.5 -> 16 here).
Dilation: the release's main(): max(ceil(H/base_h), ceil(W/base_w)) with its config's base = the training latent.
Start/stop steps: what this repository picks for the size at ``STEPS`` steps (the release's 20 %/60 % or 40 %/70 %
rule, see docs/fouriscale.md), passed to the release's pipeline_processor as its config would.
FreeU is not applied: the release's FreeU acts on 1280/640-channel up-block features only, a no-op on this
32-channel UNet (its default --disable_freeu off would change nothing here).
"""
import argparse
import importlib.util
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
HD_HELPERS = REPO / "tests" / "reference" / "hidiffusion" / "make_oracle.py"

SAMPLE_SIZE = 16            # the tiny UNet's "training" latent side here (diffusers sample_size)
SD15_LATENT = 64            # SD 1.5's training latent, the unit of the release's base settings file
STEPS = 5
CFG_SCALE = 7.5
# name, latent (H, W), (start, stop) steps (this repository's rule for the size at STEPS steps), steps stored,
# store the plain UNet's output (the weight check; the 4x one would cost 130 kB)
CASES = [
    ("sd15_2x_32x32", (32, 32), (1, 3), [0, 1, 2, 3], True),   # d = 2: dilated 0, progressive 1-2, plain 3-4
    ("sd15_4x_64x64", (64, 64), (2, 4), [0, 3], False),        # d = 4: dilated 0-1, progressive 2-3, plain 4
    ("sd15_32x48", (32, 48), (2, 4), [0, 3], True),            # d = 3, bottom/right padding to the base's aspect
]
# (the file must stay < 2 MB: every step is run, only the listed ones are stored)


def load_hd_helpers():
    spec = importlib.util.spec_from_file_location("hd_make_oracle", HD_HELPERS)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read_release_settings(release):
    layers = [ln.strip() for ln in (release / "assets/layer_settings/sd1.5.txt").read_text().splitlines()
              if ln.strip()]
    base = {}
    for ln in (release / "assets/base_settings/sd1.5.txt").read_text().splitlines():
        if ln.strip():
            name, v = ln.split(":")
            base[name] = [float(s) * SAMPLE_SIZE / SD15_LATENT for s in v.split(",")]
    return layers, base


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--release", required=True, help="folder holding the release's text2image.py, model.py, aux.py")
    ap.add_argument("--out", default=str(HERE / "oracle_tiny.pt"))
    args = ap.parse_args()
    release_dir = Path(args.release).resolve()
    sys.path.insert(0, str(release_dir))
    sys.path.insert(0, str(REPO))
    torch.set_grad_enabled(False)
    torch.set_num_threads(1)

    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from omegaconf import OmegaConf
    import text2image as release          # the release's SD script (imports model.py, aux.py)
    from aux import list_layers
    from ldm.util import instantiate_from_config

    hd = load_hd_helpers()
    unet_kwargs = dict(hd.DIFFUSERS_UNET, sample_size=SAMPLE_SIZE)

    # 1. the tiny diffusers UNet with the HiDiffusion oracle's exact weights
    unet = UNet2DConditionModel(**unet_kwargs).eval()
    params = dict(unet.named_parameters())
    qw = hd.quantized_weights([(n, tuple(p.shape)) for n, p in params.items()])
    for n, p in params.items():
        p.copy_(hd.dequantize(*qw[n]))

    # 2. LDM format, checked against this repository's UNetModel (tiny_sd1_unet.yaml, image_size 16 in memory)
    ldm_cfg = OmegaConf.load(REPO / "tests/reference/hidiffusion/tiny_sd1_unet.yaml")
    ldm_cfg.params.image_size = SAMPLE_SIZE
    ldm_unet = instantiate_from_config(ldm_cfg).eval()
    mapping = {n: hd.diffusers_to_ldm(n) for n in params}
    assert sorted(mapping.values()) == sorted(ldm_unet.state_dict())
    ldm_unet.load_state_dict({mapping[n]: hd.dequantize(*qw[n]) for n in params}, strict=True)

    g = torch.Generator().manual_seed(11)
    uncond = torch.randn(1, hd.CONTEXT_LEN, hd.CONTEXT_DIM, generator=g).half().float()
    cond = torch.randn(1, hd.CONTEXT_LEN, hd.CONTEXT_DIM, generator=g).half().float()
    ctx = torch.cat([uncond, cond])
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, release {release.__file__}")

    layers, base = read_release_settings(release_dir)
    vae = AutoencoderKL(block_out_channels=(32,), norm_num_groups=32, latent_channels=4, sample_size=64)
    scheduler = DDIMScheduler(steps_offset=1, clip_sample=False, set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=None, tokenizer=None, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)

    record_cases = {}
    for name, hw, (start, stop), keep, store_plain in CASES:
        xs = [torch.randn(1, 4, *hw, generator=g).half().float() for _ in range(STEPS)]
        # plain UNets (default attention processors), step 0's input
        t_plain = torch.tensor([501, 501])
        a = unet(torch.cat([xs[0]] * 2), t_plain, encoder_hidden_states=ctx).sample
        b = ldm_unet(torch.cat([xs[0]] * 2), t_plain, context=ctx)
        print(f"{name}: plain UNet |diffusers - ldm| max {(a - b).abs().max():.2e}")
        assert (a - b).abs().max() < 2e-5
        unet.double()
        plain64 = unet(torch.cat([xs[0]] * 2).double(), t_plain, encoder_hidden_states=ctx.double()).sample.float()
        unet.float()

        latent_h, latent_w = hw
        dilation = max(math.ceil(latent_h / SAMPLE_SIZE), math.ceil(latent_w / SAMPLE_SIZE))  # as release main()

        def release_run(dtype):
            pipe.unet.to(dtype)
            pipe.unet.set_attn_processor({n: release.TrainingFreeAttnProcessor(n) for n in list_layers})
            raw, guided, ts, fed = [], [], [], []
            hook = pipe.unet.register_forward_hook(lambda m, i, o: raw.append(o.sample.clone()))
            step_i = [0]

            def recorder(model_output, timestep, sample, *a, **k):
                guided.append(model_output.clone())
                ts.append(int(timestep))
                fed.append(sample.clone())
                step_i[0] += 1
                nxt = xs[step_i[0]] if step_i[0] < STEPS else xs[-1]
                return (nxt.to(dtype),)

            pipe.scheduler.step = recorder
            forward = release.pipeline_processor(pipe, dilation=dilation, start_step=start, stop_step=stop,
                                                 layer_settings=layers, base_settings=base, progressive=True)
            vsf = pipe.vae_scale_factor
            forward(height=latent_h * vsf, width=latent_w * vsf, num_inference_steps=STEPS,
                    guidance_scale=CFG_SCALE, prompt_embeds=cond.to(dtype), negative_prompt_embeds=uncond.to(dtype),
                    latents=xs[0].to(dtype), output_type="latent", eta=1.0)
            hook.remove()
            del pipe.scheduler.step
            pipe.unet.set_default_attn_processor()
            pipe.unet.float()
            assert all(torch.equal(f.float(), x) for f, x in zip(fed, xs))   # the inputs were the prescribed ones
            return torch.stack(raw), torch.stack(guided), ts

        raw64, guided64, ts = release_run(torch.float64)
        raw32, guided32, ts32 = release_run(torch.float32)
        assert ts == ts32 and raw64.shape[:2] == (STEPS, 3)
        err_raw = [(r32 - r64).abs().max().item() for r32, r64 in zip(raw32, raw64)]
        err_guided = [(g32 - g64).abs().max().item() for g32, g64 in zip(guided32, guided64)]
        cfg64 = raw64[:, 0] + CFG_SCALE * (raw64[:, 2] - raw64[:, 0])
        assert (cfg64 - guided64[:, 0]).abs().max() < 1e-10
        print(f"   timesteps {ts}, |release fp32 - fp64| raw {['%.1e' % e for e in err_raw]}, "
              f"guided {['%.1e' % e for e in err_guided]}, output std {raw64.std():.3f}")
        print(f"   |weak - strong cond| per step {[f'{(raw64[s, 2] - raw64[s, 1]).abs().max():.3f}' for s in range(STEPS)]}")
        keep_t = torch.tensor(keep)
        record_cases[name] = {
            "latent_hw": list(hw), "dilation": dilation, "start_step": start, "stop_step": stop,
            "steps_stored": keep_t,
            "x": torch.cat(xs)[keep_t].half(),                # (k, 4, H, W), each stored step's latent, fp16-exact
            "x0": xs[0].half(),                                # (1, 4, H, W): the plain check's input
            "t": torch.tensor(ts)[keep_t],
            "out": raw64[keep_t].float(),                      # (k, 3, 4, H, W): [uncond strong, cond strong, cond weak]
            "guided": guided64[keep_t].float(),                # (k, 1, 4, H, W): the pipeline's noise prediction
            "release_fp32_error": torch.tensor(err_raw)[keep_t],
            "release_fp32_error_guided": torch.tensor(err_guided)[keep_t],
        }
        if store_plain:
            record_cases[name]["plain_out"] = plain64   # (2, 4, H, W): plain UNet on x[0], t 501, [uncond, cond]

    oracle = {
        "format": 1,
        "weights": {"keys": [mapping[n] for n in params], "shapes": [list(p.shape) for p in params.values()],
                    "exp": [qw[n][1] for n in params], "offset": [qw[n][2] for n in params],
                    "q4": torch.cat([hd.pack4(qw[n][0]) for n in params])},
        "ldm_config": "tests/reference/hidiffusion/tiny_sd1_unet.yaml",
        "image_size": SAMPLE_SIZE,
        "uncond": uncond, "cond": cond, "cfg_scale": CFG_SCALE, "steps": STEPS,
        "release_layers": layers,
        "release_base_settings": {k: base[k] for k in layers},
        "cases": record_cases,
        "versions": {"diffusers": diffusers.__version__, "torch": str(torch.__version__),
                     "release": "LeonHLJ/FouriScale @ 6fb392eae53a5c1b67e6072f8a36cdae7b970258"},
    }
    torch.save(oracle, args.out)
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
