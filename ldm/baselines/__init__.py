"""The comparison methods of the papers' tables, each a thin layer of processors and sampler hooks:

* ``attention_scaling.py``: Jin et al. 2023 ("Attn-SF"), self-attention logits scaled by √(log N / log N_train);
* ``multidiffusion.py``: Bar-Tal et al. 2023, base-size windows denoised and averaged every step;
* ``demofusion.py``: Du et al. 2024, progressive upscaling with local (windows) and global (dilated) paths.
"""


def add_args(parser):
    """Options of the comparison methods (scripts/txt2img.py --method ...)."""
    g = parser.add_argument_group("comparison methods (--method attn_scale | multidiffusion | demofusion)")
    g.add_argument("--attn_scale_variant", choices=("published", "release"), default="published",
                   help="attn_scale: N_train = N / area ratio (published) or N / side ratio (the ScaleCrafter "
                        "authors' ScaledAttnProcessor)")
    g.add_argument("--md_window", type=int, nargs="+", default=None, metavar="LATENT",
                   help="multidiffusion: window side(s) in latent pixels (default: the model's base latent size)")
    g.add_argument("--md_stride", type=int, default=8, help="multidiffusion: window stride in latent pixels")
    g.add_argument("--md_batch", type=int, default=8, help="multidiffusion: windows per UNet call")
    g.add_argument("--df_stride", type=int, default=None,
                   help="demofusion: local window stride in latent pixels (default: half a window, 64 for SDXL)")
    g.add_argument("--df_sigma", type=float, default=0.8, help="demofusion: Gaussian sigma of the global paths")
    g.add_argument("--df_cosine_scales", type=float, nargs=3, default=[3.0, 1.0, 1.0], metavar=("C1", "C2", "C3"),
                   help="demofusion: exponents of the skip residual, the local/global fusion and the blur")
    g.add_argument("--df_view_batch", type=int, default=16, help="demofusion: windows per UNet call")
    return g


def build_guidance(method, opt, model, base_latent, image_hw, f):
    """(guidance, settings for the PNG metadata) of a comparison method."""
    unet = model.model.diffusion_model
    if method == "attn_scale":
        from ldm.baselines.attention_scaling import AttentionScalingGuidance
        area = (image_hw[0] * image_hw[1]) / float((base_latent * f) ** 2)
        return (AttentionScalingGuidance(unet, area, opt.attn_scale_variant),
                {"area_ratio": area, "variant": opt.attn_scale_variant})
    if method == "multidiffusion":
        from ldm.baselines.multidiffusion import MultiDiffusionGuidance, SDXLWindowConditioning
        window = opt.md_window or [base_latent]
        window = (window[0], window[-1])
        if min(window) < 1 or opt.md_stride < 1 or opt.md_batch < 1:
            raise ValueError("--md_window, --md_stride and --md_batch must be positive")
        per_window = SDXLWindowConditioning(model, image_hw, f) if hasattr(model, "conditioner") else None
        return (MultiDiffusionGuidance(window, opt.md_stride, opt.md_batch, per_window),
                {"window": list(window), "stride": opt.md_stride, "sdxl_window_crops": per_window is not None})
    raise ValueError(f"not a comparison method: {method}")
