"""Tiny diffusers-format folders written with diffusers' and transformers' own classes, matching
configs/tiny/tiny-{sd1,sd2,sdxl}.yaml, with random weights (test-only: needs the `diffusers` package).

Every parameter is drawn from a seeded normal distribution (norm weights around 1), so that no mapping
error hides behind a zero or a one: a weight that lands in the wrong place changes the outputs by O(1).
"""
import json
from pathlib import Path

import torch

# the diffusers counterparts of the tiny configs' UNets (attention_head_dim = heads per level, as diffusers
# uses it for SD: tiny-sd1 has num_heads 2; tiny-sd2/sdxl have num_head_channels 16)
UNETS = {
    "sd1": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=2, use_linear_projection=False),
    "sd2": dict(block_out_channels=(32, 32, 64, 64), layers_per_block=2, cross_attention_dim=32,
                down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                attention_head_dim=(2, 2, 4, 4), use_linear_projection=True),
    "sdxl": dict(block_out_channels=(32, 64, 128), layers_per_block=2, cross_attention_dim=64,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=(2, 4, 8), transformer_layers_per_block=(1, 1, 2), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=1568),
}
VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=32,
           block_out_channels=(32, 32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, sample_size=64)
CLIP_L = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
# OpenCLIP towers as diffusers stores them (gelu, MLP ratio 4); SD 2.x's has one layer fewer than the tower
OPEN_CLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, hidden_act="gelu", projection_dim=32)
PIPELINES = {"sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline"}
SCALING = {"sd1": 0.18215, "sd2": 0.18215, "sdxl": 0.13025}


def randomize(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("embedding.weight") and p.shape[0] > 1000:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)  # token embeddings: CLIP's scale
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p[0].numel() if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (fan_in ** -0.5 if p.dim() > 1 else 0.1))
    return module.eval()


def build(family, seed=0, sd2_text_layers=1):
    """{component name: diffusers/transformers model} for a tiny folder of ``family``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    parts = {"unet": UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, flip_sin_to_cos=True,
                                          freq_shift=0, norm_num_groups=32, **UNETS[family]),
             "vae": AutoencoderKL(scaling_factor=SCALING[family], **VAE)}
    if family == "sd1":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_L))
    elif family == "sd2":
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**{**OPEN_CLIP, "num_hidden_layers": sd2_text_layers}))
    else:
        parts["text_encoder"] = CLIPTextModel(CLIPTextConfig(**CLIP_L))
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**OPEN_CLIP))
    for i, m in enumerate(parts.values()):
        randomize(m, seed * 10 + i)
    return parts


def write(folder, family, seed=0, prediction="epsilon", **kw):
    """Write a tiny diffusers folder (save_pretrained of each part, model_index.json, scheduler config)."""
    folder = Path(folder)
    parts = build(family, seed, **kw)
    for name, m in parts.items():
        m.save_pretrained(folder / name, safe_serialization=True)
    index = {"_class_name": PIPELINES[family], "_diffusers_version": "0.42.1",
             "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": ["transformers", "CLIPTokenizer"],
             **{n: ["diffusers" if n in ("unet", "vae") else "transformers", type(m).__name__]
                for n, m in parts.items()}}
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "num_train_timesteps": 1000, "prediction_type": prediction}))
    return parts


# the released models' diffusers configs (the facts of their config.json files), for layout checks on the meta
# device: the UNet, VAE and text encoders of SD 1.5, SD 2.1 and SDXL base
FULL_UNETS = {
    "sd1": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
                down_block_types=UNETS["sd1"]["down_block_types"], up_block_types=UNETS["sd1"]["up_block_types"],
                attention_head_dim=8),
    "sd2": dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                down_block_types=UNETS["sd2"]["down_block_types"], up_block_types=UNETS["sd2"]["up_block_types"],
                attention_head_dim=(5, 10, 20, 20), use_linear_projection=True),
    "sdxl": dict(block_out_channels=(320, 640, 1280), layers_per_block=2, cross_attention_dim=2048,
                 down_block_types=UNETS["sdxl"]["down_block_types"], up_block_types=UNETS["sdxl"]["up_block_types"],
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
FULL_VAE = dict(VAE, block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512)
FULL_CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                   num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
FULL_SD2_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                     num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
FULL_BIGG = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                 num_attention_heads=20, max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)


def full_state_dicts(family):
    """{component: state dict of meta tensors} of a released model's diffusers folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    with torch.device("meta"):
        out = {"unet": UNet2DConditionModel(sample_size=64, in_channels=4, out_channels=4, **FULL_UNETS[family]),
               "vae": AutoencoderKL(**FULL_VAE)}
        if family == "sd1":
            out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**FULL_CLIP_L))
        elif family == "sd2":
            out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**FULL_SD2_TEXT))
        else:
            out["text_encoder"] = CLIPTextModel(CLIPTextConfig(**FULL_CLIP_L))
            out["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**FULL_BIGG))
    # transformers 5 keeps the text_model. level out of its modules but writes it in its files: as the files have it
    return {k: {(f"text_model.{n}" if k.startswith("text") and not n.startswith(("text_model.", "text_projection"))
                 else n): t for n, t in m.state_dict().items()} for k, m in out.items()}
