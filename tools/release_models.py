"""Random-weight models for the side-by-side comparison with the authors' pipelines (tools/compare_releases.py).

``write_model(spec, folder)`` writes one set of random tensors twice, for the two sides of the comparison:

* ``folder/diffusers/``: a diffusers model folder (``model_index.json``, ``unet/``, ``vae/``, ``text_encoder/``,
  ``text_encoder_2/`` for SDXL, ``tokenizer*/`` and ``scheduler/``) that the releases load with their pinned
  diffusers/transformers. The tokenizer files (``vocab.json``, ``merges.txt``) are made from the CLIP BPE
  vocabulary that ships inside the ``open_clip`` package, so nothing is downloaded.
* ``folder/model.safetensors`` and ``folder/model.yaml``: the same tensors in this repository's (CompVis) layout,
  renamed by ``ldm.convert_diffusers`` (the converter ``--ckpt FOLDER`` uses), and the config they belong to.

Specs (``SPECS``): ``sd2`` / ``sdxl`` are the released SD 2.1-base / SDXL-base architectures (their diffusers
``config.json`` facts; for a GPU), ``tiny-sd2`` / ``tiny-sdxl`` the reduced-width models of the same layout of
configs/tiny/ (for a CPU). ``base`` sets the model's training side in latent pixels (the UNet's ``sample_size``
and the config's ``image_size``), which the methods on both sides read as the base resolution.
"""
import json
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

# the diffusers counterparts (facts of the released config.json files; tiny: of configs/tiny/*.yaml)
SD_BLOCKS = dict(down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
XL_BLOCKS = dict(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
UNETS = {
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, **SD_BLOCKS),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, **XL_BLOCKS),
    "tiny-sd2": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                     attention_head_dim=(2, 2, 4, 4), use_linear_projection=True, **SD_BLOCKS),
    "tiny-sdxl": dict(block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=64,
                      attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=256,
                      projection_class_embeddings_input_dim=1568, **XL_BLOCKS),
}
VAES = {"full": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2),
        "tiny": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=1)}
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              hidden_act="quick_gelu", projection_dim=768)
TEXT = {  # (diffusers folder, transformers class, config); SD 2.x's tower is stored one layer short (penultimate)
    "sd2": [("text_encoder", "CLIPTextModel", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                   num_attention_heads=16, hidden_act="gelu", projection_dim=512))],
    "sdxl": [("text_encoder", "CLIPTextModel", CLIP_L),
             ("text_encoder_2", "CLIPTextModelWithProjection",
              dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280))],
    "tiny-sd2": [("text_encoder", "CLIPTextModel", dict(hidden_size=32, intermediate_size=128, num_hidden_layers=1,
                                                        num_attention_heads=2, hidden_act="gelu", projection_dim=32))],
    "tiny-sdxl": [("text_encoder", "CLIPTextModel", dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                         num_attention_heads=2, hidden_act="quick_gelu",
                                                         projection_dim=32)),
                  ("text_encoder_2", "CLIPTextModelWithProjection",
                   dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                        hidden_act="gelu", projection_dim=32))],
}
CONFIGS = {"sd2": "configs/stable-diffusion/v2-inference.yaml",
           "sdxl": "configs/stable-diffusion/sdxl-base-inference.yaml",
           "tiny-sd2": "configs/tiny/tiny-sd2.yaml", "tiny-sdxl": "configs/tiny/tiny-sdxl.yaml"}
SCALING = {"sd2": 0.18215, "sdxl": 0.13025}
# the released folders' schedulers (SD 2.1-base: DDIM-compatible; SDXL base: Euler), as their JSON files say
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                 steps_offset=1, prediction_type="epsilon", timestep_spacing="leading")
SCHEDULERS = {"sd2": dict(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False, **SCHEDULER),
              "sdxl": dict(_class_name="EulerDiscreteScheduler", interpolation_type="linear", use_karras_sigmas=False,
                           **SCHEDULER)}
# the tokenizers' special tokens: CLIP ViT-L pads with <|endoftext|>, the OpenCLIP towers' tokenizers with "!"
TOKENIZER_PAD = {"CLIPTextModel-quick_gelu": "<|endoftext|>", "gelu": "!"}


def family(spec):
    return spec.split("-")[-1]


def default_base(spec):
    """The released model's training side in latent pixels (64 for SD 2.1-base, 128 for SDXL)."""
    return 128 if family(spec) == "sdxl" else 64


def diffusers_modules(spec, base):
    """{component: (module on the meta device, its config dict)} of the diffusers folder of ``spec``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    classes = {"CLIPTextModel": CLIPTextModel, "CLIPTextModelWithProjection": CLIPTextModelWithProjection}
    vae_cfg = dict(in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=32, sample_size=base * 8,
                   down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                   scaling_factor=SCALING[family(spec)], **VAES["tiny" if spec.startswith("tiny") else "full"])
    unet_cfg = dict(sample_size=base, in_channels=4, out_channels=4, flip_sin_to_cos=True, freq_shift=0,
                    norm_num_groups=32, **UNETS[spec])
    out = {}
    with torch.device("meta"):
        out["unet"] = (UNet2DConditionModel(**unet_cfg), unet_cfg)
        out["vae"] = (AutoencoderKL(**vae_cfg), vae_cfg)
        for name, cls, cfg in TEXT[spec]:
            cfg = dict(vocab_size=49408, max_position_embeddings=77, **cfg)
            out[name] = (classes[cls](CLIPTextConfig(**cfg)), dict(cfg, architectures=[cls], model_type="clip_text_model",
                                                                    torch_dtype="float32"))
    return out


def file_keys(component, module):
    """{name in the file: tensor} of a module's state dict: transformers 5 keeps the ``text_model.`` level out of
    its modules but writes it in its files, where the pinned transformers expect it."""
    sd = module.state_dict()
    if not component.startswith("text"):
        return sd
    return {(n if n.startswith(("text_model.", "text_projection")) else f"text_model.{n}"): t for n, t in sd.items()
            if not n.endswith("position_ids")}


def random_tensors(shapes, seed):
    """{name: float32 tensor} for {name: (shape, ...)}: seeded normal values scaled by fan-in (norm weights around 1,
    token embeddings at CLIP's scale), finite and O(1) activations, in name order so the values depend only on
    the seed and the names."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if "norm" in name and name.endswith("weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("embedding.weight") and shape[0] > 1000:
            t = 0.02 * torch.randn(shape, generator=g)
        elif len(shape) > 1:
            fan_in = 1
            for s in shape[1:]:
                fan_in *= s
            t = torch.randn(shape, generator=g) * fan_in ** -0.5
        else:
            t = 0.1 * torch.randn(shape, generator=g)
        out[name] = t
    return out


def tokenizer_files(folder, pad_token):
    """vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json of CLIP's tokenizer, from the
    BPE file inside open_clip (ldm.modules.encoders.tokenizer reads it the same way)."""
    from ldm.modules.encoders.tokenizer import build_vocab, read_merges
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = read_merges()
    (folder / "vocab.json").write_text(json.dumps(build_vocab(merges)))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": pad_token}
    (folder / "special_tokens_map.json").write_text(json.dumps(special))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        dict(special, model_max_length=77, do_lower_case=True, errors="replace", tokenizer_class="CLIPTokenizer")))


def own_config(spec, base, path):
    """The repository's config of ``spec`` with ``image_size`` (the base latent side) set to ``base``."""
    from omegaconf import OmegaConf
    cfg = OmegaConf.load(REPO_ROOT / CONFIGS[spec])
    cfg.model.params.image_size = int(base)
    OmegaConf.save(cfg, path)
    return cfg


def write_model(spec, folder, base=None, seed=0, dtype=torch.float32):
    """Write ``folder/diffusers/`` (for the releases) and ``folder/model.safetensors`` + ``folder/model.yaml`` (for
    this repository) with the same random tensors, stored in ``dtype`` (float16 halves the files of the full-size
    models for a GPU run, where both sides compute in float16); returns {"diffusers", "ckpt", "config", "notes",
    "tensors"}."""
    from safetensors.torch import save_file
    from ldm.convert_diffusers import convert_components
    from ldm.util import instantiate_from_config, no_weight_init
    folder = Path(folder)
    base = int(base or default_base(spec))
    d = folder / "diffusers"
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, (component, (module, cfg)) in enumerate(diffusers_modules(spec, base).items()):
        keys = file_keys(component, module)
        tensors[component] = {n: t.to(dtype) for n, t in
                              random_tensors({n: t.shape for n, t in keys.items()}, seed * 100 + k).items()}
        (d / component).mkdir(exist_ok=True)
        name = "model.safetensors" if component.startswith("text") else "diffusion_pytorch_model.safetensors"
        save_file(tensors[component], str(d / component / name), metadata={"format": "pt"})  # old transformers need it
        cls = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL"}.get(component)
        cfg = dict(cfg, _class_name=cls, _diffusers_version="0.20.2") if cls else dict(cfg)
        (d / component / "config.json").write_text(json.dumps(cfg, indent=1))
    texts = TEXT[spec]
    for i, (name, cls, cfg) in enumerate(texts):
        pad = TOKENIZER_PAD["CLIPTextModel-quick_gelu"] if cfg["hidden_act"] == "quick_gelu" else TOKENIZER_PAD["gelu"]
        tokenizer_files(d / ("tokenizer" if i == 0 else f"tokenizer_{i + 1}"), pad)
    fam = family(spec)
    sched = SCHEDULERS[fam]
    (d / "scheduler").mkdir(exist_ok=True)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=1))
    index = {"_class_name": "StableDiffusionXLPipeline" if fam == "sdxl" else "StableDiffusionPipeline",
             "_diffusers_version": "0.20.2", "scheduler": ["diffusers", sched["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for i, (name, cls, _) in enumerate(texts):
        index[name] = ["transformers", cls]
        index["tokenizer" if i == 0 else f"tokenizer_{i + 1}"] = ["transformers", "CLIPTokenizer"]
    if fam == "sdxl":
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    (d / "model_index.json").write_text(json.dumps(index, indent=1))
    # this repository's side: the same tensors renamed into the CompVis layout by the converter
    cfg = own_config(spec, base, folder / "model.yaml")
    with no_weight_init():
        model = instantiate_from_config(cfg.model)
    own, notes = convert_components(lambda component: tensors[component], model)
    unmapped = sorted(k for k in own if "/" in k)
    if unmapped:
        raise ValueError(f"diffusers keys without a counterpart in {CONFIGS[spec]}: {unmapped[:5]}")
    save_file({k: v.contiguous() for k, v in own.items()}, str(folder / "model.safetensors"))
    return {"diffusers": d, "ckpt": folder / "model.safetensors", "config": folder / "model.yaml", "notes": notes,
            "tensors": tensors}
