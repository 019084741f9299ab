"""What one sampling step costs in each benchmark mode (used by scripts/benchmark.py).

``plain`` is one classifier-free-guidance UNet evaluation on a batch of ``batch`` latents.
"""
import torch


def make_step(mode, unet, size, batch, device, dtype):
    x = torch.randn(batch, unet.in_channels, size, size, device=device, dtype=dtype)
    t = torch.full((batch,), 500, device=device, dtype=torch.long)
    ctx_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
    context = torch.randn(batch, 77, ctx_dim, device=device, dtype=dtype)
    if mode == "plain":
        return lambda i: unet(x, t, context=context)
    raise ValueError(f"unknown benchmark mode {mode!r}")
