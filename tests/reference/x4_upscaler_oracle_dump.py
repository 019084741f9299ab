"""How x4_upscaler_oracle_tiny.pt was made (kept for provenance; not a test).

    python tests/reference/x4_upscaler_oracle_dump.py /path/to/stablediffusion OUT.pt

``/path/to/stablediffusion`` is a throw-away copy of Stability-AI/stablediffusion (commit ``SD_COMMIT`` below),
outside any repository, run in an environment with open_clip_torch 2.0.2 (the open_clip of the SD 2.x era: the
original text encoder permutes its input to sequence-first, as open_clip 2.0.2's transformer expects; open_clip 3.x
builds it batch-first, where the same call would attend across the batch). This
script imports *that* code (not this repository's ``ldm``: the script's folder, not the repository root, is on
``sys.path``), applies run-time shims only (no file of the copy is edited), builds ``LatentUpscaleDiffusion``
from this repository's ``configs/tiny/tiny-x4-upscaler.yaml`` with the original classes, gives every parameter
deterministic values and records, on the CPU in float32:

* the noise augmentation (``ImageConcatWithNoiseAugmentation.forward`` with its noise fixed),
* the text conditioning (``get_learned_conditioning``, ``get_unconditional_conditioning``),
* one ``apply_model`` call with the hybrid-adm condition dict,
* two 4-step DDIM runs (eta 0, fixed x_T) with the original ``DDIMSampler``: without guidance and with
  classifier-free guidance as the original ``scripts/gradio/superresolution.py`` builds it (same noised image
  and level in both branches, the empty prompt for the unconditional one), and ``decode_first_stage`` of both.

The shims: ``pytorch_lightning.utilities.distributed`` (removed from newer pytorch-lightning), a stub ``kornia``
(imported by the encoders module, unused here), placeholders for transformers classes the encoders module
imports but this model does not use, and ``open_clip.create_model_and_transforms`` building a ``CLIP`` from the
config's ``arch`` dict (the original passes ``arch`` on as a model name) with no pretrained weights; the text
encoder's ``device`` attribute (a constructor argument the tiny config leaves at its default, "cuda") is set to
"cpu", and the sampler is made with ``device=cpu``.

Weights (``init_recipe`` below, stored in the file): per state-dict key of each parameter, a CPU generator seeded
with crc32(key); matrices/convolutions/embeddings N(0, 1/fan_in), norm scales 1 + 0.05 N, other vectors 0.05 N,
rounded to float16 and back. The parameters (7.2 M in the UNet alone, 29 MB) are not stored: a reader regenerates
them by the recipe and compares ``param_checksums`` (float64 sum and sum of absolute values per key) before
anything else. The persistent buffers (the two noise schedules) are stored as they are (``buffers``);
``state_dict_keys`` is the original state dict's key order.
"""
import platform
import sys
import types
import zlib
from pathlib import Path

SD_COMMIT = "cf1d67a6fd5ea1aa600c4df58e5b47da45f6bdbf"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG = REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"
PROMPTS = ["a cat", "a red fox"]
NEG = ""
LEVELS_AUG = [20, 100]  # noise augmentation and the UNet call: one level per image
LEVEL_DDIM = 20  # the DDIM runs: the original demo's default, the same for both images
STEPS = 4
SCALE = 5.0
UNET_T = [37, 811]
INIT_RECIPE = ("for each (key, p) in model.named_parameters() (key = state-dict key): g = torch.Generator() seeded "
               "zlib.crc32(key); r = torch.randn(p.shape, generator=g); p.dim() >= 2: r / sqrt(p.numel() // "
               "p.shape[0]); else key ends in 'weight': 1 + 0.05 r; else 0.05 r; rounded to float16 and back.")


def shims(torch):
    from pytorch_lightning.utilities.rank_zero import rank_zero_only
    mod = types.ModuleType("pytorch_lightning.utilities.distributed")
    mod.rank_zero_only = rank_zero_only
    sys.modules["pytorch_lightning.utilities.distributed"] = mod
    sys.modules["kornia"] = types.ModuleType("kornia")
    import transformers
    for name in ("T5Tokenizer", "T5EncoderModel", "CLIPTokenizer", "CLIPTextModel"):
        if not hasattr(transformers, name):
            setattr(transformers, name, object)
    import open_clip
    from omegaconf import DictConfig, OmegaConf
    from open_clip.model import CLIP

    def create(arch, device=None, pretrained=None, **kw):
        assert isinstance(arch, (dict, DictConfig)), arch
        cfg = OmegaConf.to_container(arch) if isinstance(arch, DictConfig) else dict(arch)
        embed_dim = cfg.pop("embed_dim")
        vision = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}  # deleted after
        return CLIP(embed_dim=embed_dim, vision_cfg=vision, text_cfg=cfg).to(device), None, None
    open_clip.create_model_and_transforms = create
    return open_clip


def init_weights(torch, model):
    with torch.no_grad():
        for key, p in model.named_parameters():
            g = torch.Generator().manual_seed(zlib.crc32(key.encode("utf-8")))
            r = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if p.dim() >= 2:
                v = r / (p.numel() // p.shape[0]) ** 0.5
            elif key.endswith("weight"):
                v = 1 + 0.05 * r
            else:
                v = 0.05 * r
            p.copy_(v.half().float())


def rel_change(a, b):
    return float((a - b).norm() / b.norm())


def main(orig, out):
    orig = Path(orig).resolve()
    sys.path.insert(0, str(orig))
    import numpy as np
    import torch
    torch.set_grad_enabled(False)
    open_clip = shims(torch)
    from omegaconf import OmegaConf
    import ldm.models.diffusion.ddim as ddim
    import ldm.models.diffusion.ddpm as ddpm
    import ldm.modules.diffusionmodules.upscaling as upscaling
    from ldm.util import instantiate_from_config
    for mod in (ddim, ddpm, upscaling):  # the original, not this repository
        assert Path(mod.__file__).resolve().is_relative_to(orig), mod.__file__
    DDIMSampler, LatentUpscaleDiffusion = ddim.DDIMSampler, ddpm.LatentUpscaleDiffusion

    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.load(CONFIG).model)
    assert type(model) is LatentUpscaleDiffusion
    model.cond_stage_model.device = "cpu"
    model = model.eval()
    init_weights(torch, model)

    g = torch.Generator().manual_seed(1234)
    x_lr = (torch.rand(2, 3, 16, 16, generator=g) * 2 - 1)
    aug_noise = torch.randn(2, 3, 16, 16, generator=g)
    x_t = torch.randn(2, 4, 16, 16, generator=g)
    x_T = torch.randn(2, 4, 16, 16, generator=g)
    ddim_aug_seed = 99  # the DDIM runs' augmentation noise: the first draw of a generator with this seed
    ddim_aug_noise = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(ddim_aug_seed))

    def augment(x, levels, noise):
        real = torch.randn_like

        def fixed(t, *a, **k):
            assert t.shape == noise.shape
            return noise.clone()
        torch.randn_like = fixed  # q_sample draws its noise with torch.randn_like
        try:
            return model.low_scale_model(x, torch.tensor(levels, dtype=torch.long))
        finally:
            torch.randn_like = real

    x_aug, aug_level = augment(x_lr, LEVELS_AUG, aug_noise)
    c = model.get_learned_conditioning(PROMPTS)
    uc = model.get_unconditional_conditioning(2, NEG)
    cond = {"c_concat": [x_aug], "c_crossattn": [c], "c_adm": aug_level}
    t = torch.tensor(UNET_T, dtype=torch.long)
    unet_out = model.apply_model(x_t, t, cond)

    x_aug_ddim, ddim_level = augment(x_lr, [LEVEL_DDIM] * 2, ddim_aug_noise)
    ddim_cond = {"c_concat": [x_aug_ddim], "c_crossattn": [c], "c_adm": ddim_level}
    ddim_uncond = {"c_concat": [x_aug_ddim], "c_crossattn": [uc], "c_adm": ddim_level}
    sampler = DDIMSampler(model, device=torch.device("cpu"))
    runs = {}
    for name, scale in (("ddim_noguide", 1.0), ("ddim_cfg", SCALE)):
        pred_x0 = []
        samples, _ = sampler.sample(STEPS, 2, (model.channels, 16, 16), ddim_cond, verbose=False, eta=0.0,
                                    x_T=x_T.clone(), unconditional_guidance_scale=scale,
                                    unconditional_conditioning=ddim_uncond if scale != 1.0 else None,
                                    img_callback=lambda p, i: pred_x0.append(p.clone()))
        runs[name] = {"scale": scale, "samples": samples, "pred_x0_per_step": torch.stack(pred_x0),
                      "decoded": model.decode_first_stage(samples)}

    # how much the recorded outputs depend on each input (a wrong reimplementation must not pass by accident)
    sens = {
        "unet_context_zero": rel_change(model.apply_model(x_t, t, {**cond, "c_crossattn": [c * 0]}), unet_out),
        "unet_t_500": rel_change(model.apply_model(x_t, torch.tensor([500, 500]), cond), unet_out),
        "unet_level_swapped": rel_change(model.apply_model(x_t, t, {**cond, "c_adm": aug_level.flip(0)}), unet_out),
        "unet_concat_zero": rel_change(model.apply_model(x_t, t, {**cond, "c_concat": [x_aug * 0]}), unet_out),
        "unet_x_half": rel_change(model.apply_model(x_t * 0.5, t, cond), unet_out),
        "ddim_cfg_vs_noguide_samples": rel_change(runs["ddim_cfg"]["samples"], runs["ddim_noguide"]["samples"]),
        "ddim_cfg_vs_noguide_decoded": rel_change(runs["ddim_cfg"]["decoded"], runs["ddim_noguide"]["decoded"]),
        "text_prompt0_vs_empty": rel_change(c[0], uc[0]),
    }
    for k, v in sens.items():
        print(f"{k}: {v:.4f}")

    sd = model.state_dict()
    params = dict(model.named_parameters())
    assert all(k in sd for k in params)
    buffers = {k: v.contiguous().clone() for k, v in sd.items() if k not in params}
    checksums = {k: [float(v.double().sum()), float(v.double().abs().sum())] for k, v in params.items()}
    versions = {"python": platform.python_version(), "torch": str(torch.__version__), "numpy": np.__version__}
    for mod in ("open_clip", "pytorch_lightning", "omegaconf", "einops", "transformers"):
        m = __import__(mod)
        versions[mod] = str(getattr(m, "__version__", None) or __import__(mod + ".version").version.__version__)
    data = {
        "source": f"Stability-AI/stablediffusion@{SD_COMMIT}", "versions": versions,
        "config": "configs/tiny/tiny-x4-upscaler.yaml", "init_recipe": INIT_RECIPE,
        "state_dict_keys": list(sd), "param_shapes": {k: list(v.shape) for k, v in params.items()},
        "param_checksums": checksums, "buffers": buffers,
        "parameterization": model.parameterization, "scale_factor": float(model.scale_factor),
        "max_noise_level": int(model.low_scale_model.max_noise_level),
        "prompts": PROMPTS, "negative_prompt": NEG, "tokens": open_clip.tokenize(PROMPTS),
        "context": c, "uncond_context": uc,
        "aug": {"x_lr": x_lr, "noise_level": torch.tensor(LEVELS_AUG), "noise": aug_noise, "x_aug": x_aug,
                "noise_level_out": aug_level},
        "unet": {"x_t": x_t, "t": t, "c_concat": x_aug, "c_crossattn": c, "c_adm": aug_level, "out": unet_out},
        "ddim": {"steps": STEPS, "eta": 0.0, "x_T": x_T, "x_lr": x_lr, "noise_level": LEVEL_DDIM,
                 "aug_noise": ddim_aug_noise, "aug_noise_generator_seed": ddim_aug_seed, "x_aug": x_aug_ddim,
                 "timesteps": torch.from_numpy(np.asarray(sampler.ddim_timesteps, dtype=np.int64)), **runs},
        "sensitivity": sens,
    }
    assert all(v.dtype == torch.float32 for v in sd.values())
    torch.save(data, out)
    print(f"wrote {out}: {Path(out).stat().st_size} bytes; state dict: {len(params)} parameters "
          f"({sum(p.numel() for p in params.values())} elements), {len(buffers)} buffers")


if __name__ == "__main__":
    main(*sys.argv[1:3])
