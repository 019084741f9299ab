"""How x4_upscaler_state_dict.json and x4_upscaler_summary.json were made (kept for provenance; not a test).

    python tests/reference/x4_upscaler_dump.py /path/to/stablediffusion OUTDIR

``/path/to/stablediffusion`` is a throw-away copy of Stability-AI/stablediffusion (commit cf1d67a6), outside any
repository. This script imports *that* code (not this repository's ``ldm``), applies run-time shims only (no file
of the copy is edited), builds ``LatentUpscaleDiffusion`` from its ``configs/stable-diffusion/x4-upscaling.yaml``
on the meta device (the two noise schedules on the CPU) and writes the layout and a summary.
"""
import collections
import json
import sys
import types
from pathlib import Path


def main(orig, outdir):
    sys.path.insert(0, str(orig))
    import torch
    from pytorch_lightning.utilities.rank_zero import rank_zero_only
    shim = types.ModuleType("pytorch_lightning.utilities.distributed")
    shim.rank_zero_only = rank_zero_only  # removed from newer pytorch-lightning
    sys.modules["pytorch_lightning.utilities.distributed"] = shim
    sys.modules["kornia"] = types.ModuleType("kornia")  # imported by the encoders module, unused here
    import transformers
    for name in ("T5Tokenizer", "T5EncoderModel", "CLIPTokenizer", "CLIPTextModel"):
        if not hasattr(transformers, name):
            setattr(transformers, name, object)
    import open_clip
    create = open_clip.create_model_and_transforms
    def create_on_meta(arch, device=None, pretrained=None, **kw):  # no download, nothing allocated
        return create(arch, device=torch.device("meta"), pretrained=None, **kw)
    open_clip.create_model_and_transforms = create_on_meta
    from omegaconf import OmegaConf
    import ldm.models.diffusion.ddpm as ddpm
    import ldm.modules.diffusionmodules.upscaling as upscaling
    from ldm.util import instantiate_from_config

    def on_cpu(fn):
        def wrapped(self, *a, **k):
            with torch.device("cpu"):
                return fn(self, *a, **k)
        return wrapped
    ddpm.DDPM.register_schedule = on_cpu(ddpm.DDPM.register_schedule)
    upscaling.AbstractLowScaleModel.register_schedule = on_cpu(upscaling.AbstractLowScaleModel.register_schedule)
    cfg = OmegaConf.load(Path(orig) / "configs/stable-diffusion/x4-upscaling.yaml")
    with torch.device("meta"):
        model = instantiate_from_config(cfg.model)
    sd = model.state_dict()
    outdir = Path(outdir)
    json.dump({k: list(v.shape) for k, v in sd.items()}, open(outdir / "x4_upscaler_state_dict.json", "w"), indent=1)

    def count(prefix):
        keys = [k for k in sd if k.startswith(prefix)]
        return [len(keys), sum(sd[k].numel() for k in keys)]
    per_level = collections.OrderedDict()
    for k, v in sd.items():
        if k.startswith("model.diffusion_model."):
            per_level[k.split(".")[2]] = per_level.get(k.split(".")[2], 0) + v.numel()
    summary = {
        "class": type(model).__name__, "low_scale_class": type(model.low_scale_model).__name__,
        "parameterization": model.parameterization, "scale_factor": model.scale_factor,
        "max_noise_level": model.low_scale_model.max_noise_level, "state_dict_entries": len(sd),
        "tensors_and_elements": {p: count(p + ".") for p in ("model.diffusion_model", "first_stage_model",
                                                            "cond_stage_model", "low_scale_model")},
        "unet_elements_per_second_level_prefix": per_level,
        "total_parameters": sum(p.numel() for p in model.parameters()),
        "low_scale_alphas_cumprod_float32": [float(v) for v in model.low_scale_model.alphas_cumprod],
        "ddpm_alphas_cumprod_float32_first_last": [float(model.alphas_cumprod[0]), float(model.alphas_cumprod[-1])],
    }
    json.dump(summary, open(outdir / "x4_upscaler_summary.json", "w"), indent=1)


if __name__ == "__main__":
    main(*sys.argv[1:3])
