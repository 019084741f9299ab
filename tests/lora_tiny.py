"""Random LoRA files for the tiny diffusers folders of tests/diffusers_tiny.py, in kohya-ss's key format
(test-only). SD 1.x/2.x kohya files name UNet modules in diffusers' spelling, SDXL files in the sgm/LDM one
(``input_blocks_4_1_…``), as kohya-ss's trainers write them."""
import torch

# diffusers module names (UNet) per family; each family's list covers attention (self, cross, out), feed-forward,
# the transformer's projections, ResBlock 3x3 convs (LoCon), 1x1 shortcuts, time-embedding projections and
# down/upsampling convs, on every side of the UNet
UNET_MODULES = {
    "sd1": ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_k",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v",
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
            "down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k",
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
            "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2",
            "up_blocks.3.attentions.0.proj_in", "up_blocks.2.attentions.1.proj_out",
            "down_blocks.1.resnets.0.conv1", "mid_block.resnets.1.conv2", "up_blocks.0.resnets.2.conv1",
            "up_blocks.2.resnets.0.conv_shortcut", "down_blocks.3.resnets.1.time_emb_proj",
            "down_blocks.0.downsamplers.0.conv", "up_blocks.1.upsamplers.0.conv"],
    "sdxl": ["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "down_blocks.2.attentions.1.transformer_blocks.1.attn2.to_k",
             "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0",
             "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj",
             "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_v",
             "up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
             "up_blocks.1.attentions.0.proj_in", "down_blocks.2.attentions.1.proj_out",
             "down_blocks.1.resnets.0.conv1", "mid_block.resnets.0.conv2", "up_blocks.0.resnets.1.conv2",
             "up_blocks.2.resnets.1.conv_shortcut", "down_blocks.0.resnets.1.time_emb_proj",
             "down_blocks.1.downsamplers.0.conv", "up_blocks.0.upsamplers.0.conv"],
}
UNET_MODULES["sd2"] = UNET_MODULES["sd1"]
TEXT_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.0.self_attn.k_proj",
                "text_model.encoder.layers.0.self_attn.v_proj", "text_model.encoder.layers.0.self_attn.out_proj",
                "text_model.encoder.layers.0.mlp.fc1", "text_model.encoder.layers.0.mlp.fc2"]


def _pair(module, rank, g, std=0.25):
    w = module.weight
    if w.dim() == 4:  # conv: down keeps the kernel, up is 1x1 (LoCon)
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * std
        up = torch.randn(w.shape[0], rank, 1, 1, generator=g) * std
    else:
        down = torch.randn(rank, w.shape[1], generator=g) * std
        up = torch.randn(w.shape[0], rank, generator=g) * std
    return down, up


def kohya_lora(family, parts, own_names=None, rank=4, alpha=2.0, seed=0, unet_alphas=None, pairs=None):
    """{key: tensor} in kohya's format for the diffusers ``parts``; ``own_names`` (diffusers name -> this UNet's
    module name) gives SDXL's sgm spelling. ``unet_alphas``: {diffusers name: alpha} for the UNet modules (else
    ``alpha`` everywhere); ``pairs`` (a dict) receives {diffusers name: (down, up)} of the UNet modules."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    unet_mods = dict(parts["unet"].named_modules())
    for name in UNET_MODULES[family]:
        key = "lora_unet_" + (own_names[name] if family == "sdxl" else name).replace(".", "_")
        sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = _pair(unet_mods[name], rank, g)
        sd[key + ".alpha"] = torch.tensor((unet_alphas or {}).get(name, alpha))
        if pairs is not None:
            pairs[name] = (sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"])
    encoders = [("lora_te_", "text_encoder")] if family != "sdxl" else [("lora_te1_", "text_encoder"),
                                                                       ("lora_te2_", "text_encoder_2")]
    for prefix, component in encoders:
        mods = {n if n.startswith("text_model.") else "text_model." + n: m  # transformers 5 drops the level
                for n, m in parts[component].named_modules()}
        for name in TEXT_MODULES:
            key = prefix + name.replace(".", "_")
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = _pair(mods[name], rank, g)
            sd[key + ".alpha"] = torch.tensor(alpha)
    return sd
