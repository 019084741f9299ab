"""Attention scaling (Jin et al., 2023, "Training-free Diffusion Model Adaptation for Variable-Sized
Text-to-Image Synthesis"): the "Attn-SF" row of the ScaleCrafter paper's tables.

Self-attention over N tokens where the model was trained on N_train keeps its entropy when the logits are
multiplied by √(log N / log N_train). Per layer, N is the token count of the call and N_train the token count
the same layer had at the training resolution.

* ``variant="published"`` (default): N_train = N / (area ratio), the paper's formula;
* ``variant="release"``: N_train = N / (side ratio), as the ScaleCrafter authors' ``ScaledAttnProcessor``
  computes it (their area-ratio line is commented out). Their processor is defined but never called by their
  scripts, and with diffusers' default ``AttnProcessor2_0`` the scale it sets would not reach the SDPA call;
  the variant is here for anyone comparing with that code.
Cross-attention (to the text) is unchanged.
"""
import math

import torch.nn.functional as F

from ldm.methods.base import GuidanceMethod, Settings

VARIANTS = ("published", "release")


def scale_factor(n_tokens, area_ratio, variant="published"):
    """√(log N / log N_train) for a layer of ``n_tokens`` tokens at ``area_ratio`` = test area / train area."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    ratio = area_ratio if variant == "published" else math.sqrt(area_ratio)
    n_train = n_tokens / ratio
    if n_train <= 1 or n_tokens <= 1:
        return 1.0
    return math.sqrt(math.log(n_tokens) / math.log(n_train))


class AttentionScaling:
    """Attention processor for ``CrossAttention`` layers (see ``ldm.unet_hooks.processors.installed``)."""

    def __init__(self, area_ratio, variant="published"):
        if area_ratio <= 0:
            raise ValueError(f"area_ratio must be positive, got {area_ratio}")
        scale_factor(4, 1.0, variant)  # validates the variant
        self.area_ratio = float(area_ratio)
        self.variant = variant

    def __repr__(self):
        return f"AttentionScaling(area_ratio={self.area_ratio:g}, variant={self.variant})"

    def __call__(self, attn, x, context=None, mask=None):
        if context is not None:
            return type(attn).forward(attn, x, context, mask)
        factor = scale_factor(x.shape[1], self.area_ratio, self.variant)
        b, n, _ = x.shape
        q, k, v = (t.reshape(b, n, attn.heads, attn.dim_head).transpose(1, 2)
                   for t in (attn.to_q(x), attn.to_k(x), attn.to_v(x)))
        if mask is not None:
            mask = mask.reshape(b, 1, 1, -1).bool()
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale * factor)
        return attn.to_out(out.transpose(1, 2).reshape(b, n, attn.heads * attn.dim_head))


class AttentionScalingGuidance:
    """``guidance`` for the DDIM sampler: every self-attention layer scaled, then plain CFG."""

    def __init__(self, unet, area_ratio, variant="published"):
        from ldm.unet_hooks.processors import self_attention_layers
        self.layers = self_attention_layers(unet)
        self.processor = AttentionScaling(area_ratio, variant)

    def __call__(self, model, x, t, cond, uncond, scale, step):
        from ldm.guidance import classifier_free_guidance
        from ldm.unet_hooks.processors import installed
        with installed([(layer, self.processor) for layer in self.layers]):
            return classifier_free_guidance(model, x, t, cond, uncond, scale)


# ---------------------------------------------------------------------------------------------
# the method (--method attn_scale)


class AttentionScalingMethod(GuidanceMethod):
    name = "attn_scale"
    label = "attention scaling"
    summary = "attention scaling (Jin et al.): self-attention logits scaled by sqrt(log N / log N_train)"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("attention scaling (--method attn_scale)")
        g.add_argument("--attn_scale_variant", choices=("published", "release"), default="published",
                       help="N_train = N / area ratio (published) or N / side ratio (the ScaleCrafter authors' "
                            "ScaledAttnProcessor)")

    @classmethod
    def settings(cls, opt, info, size):
        area = (size[0] * size[1]) / float(info.base_px ** 2)
        return Settings(size=tuple(size), values={"area_ratio": area, "variant": opt.attn_scale_variant})

    def make_guidance(self):
        v = self.settings.values
        return AttentionScalingGuidance(self.model.model.diffusion_model, v["area_ratio"], v["variant"])

    def describe(self):
        return {"attn_scale": dict(self.settings.values)}
