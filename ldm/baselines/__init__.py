"""The comparison methods of the papers' tables, each a thin layer of processors and sampler hooks:

* ``attention_scaling.py``: Jin et al. 2023 ("Attn-SF"), self-attention logits scaled by √(log N / log N_train);
* ``multidiffusion.py``: Bar-Tal et al. 2023, base-size windows denoised and averaged every step;
* ``demofusion.py``: Du et al. 2024, progressive upscaling with local (windows) and global (dilated) paths.
* ``hidiffusion.py``: Zhang et al. 2024, RAU-Net (resolution-aware down/upsampling in the first steps) and
  MSW-MSA (shifted-window self-attention in the top level).
* ``fouriscale.py``: Huang et al. 2024, dilated convolutions on low-pass filtered inputs, FouriScale guidance.
"""
import argparse


def add_args(parser):
    """Options of the comparison methods (scripts/txt2img.py --method ...)."""
    g = parser.add_argument_group(
        "comparison methods (--method attn_scale | multidiffusion | demofusion | hidiffusion)")
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
    g.add_argument("--hidiff_raunet", action=argparse.BooleanOptionalAction, default=True,
                   help="hidiffusion: RAU-Net (resolution-aware down/upsampling in the first steps; the release's "
                        "apply_raunet, on by default)")
    g.add_argument("--hidiff_window_attn", action=argparse.BooleanOptionalAction, default=True,
                   help="hidiffusion: MSW-MSA shifted-window self-attention in the top level (the release's "
                        "apply_window_attn, on by default)")
    g.add_argument("--hidiff_T1_ratio", type=float, default=None, metavar="R",
                   help="hidiffusion: T1 = int(steps * R) (default by latent size as the release: 0.4 below 4x the "
                        "training side, else 0.7)")
    g.add_argument("--hidiff_T2_ratio", type=float, default=None, metavar="R",
                   help="hidiffusion: T2 = int(steps * R) (default: 0 below 4x the training side, else 0.3)")
    g.add_argument("--hidiff_aggressive", choices=("auto", "on", "off"), default="auto",
                   help="hidiffusion: SDXL's aggressive RAU-Net schedule (auto: below the 4096 preset, as the "
                        "release)")
    from ldm.baselines.fouriscale import add_args as add_fouriscale_args
    add_fouriscale_args(parser)
    return g


def prepare_options(method, opt, family, base_px, side):
    """Option defaults a method sets before the model is loaded (FouriScale: its preset's image size, SDXL's
    size conditioning); FouriScale options without --method fouriscale are an error (ValueError)."""
    from ldm.baselines import fouriscale
    if method == "fouriscale":
        fouriscale.prepare_options(opt, family, base_px, side)
    elif fouriscale.given_options(opt):
        raise ValueError(f"{', '.join(fouriscale.given_options(opt))}: FouriScale options; add --method fouriscale "
                         f"(got --method {method})")


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
    if method == "hidiffusion":
        from ldm.baselines.hidiffusion import HiDiffusionGuidance
        guide = HiDiffusionGuidance(unet, opt.steps, base_latent, apply_raunet=opt.hidiff_raunet,
                                    apply_window_attn=opt.hidiff_window_attn, t1_ratio=opt.hidiff_T1_ratio,
                                    t2_ratio=opt.hidiff_T2_ratio, seed=opt.seed,
                                    aggressive={"auto": None, "on": True, "off": False}[opt.hidiff_aggressive])
        return guide, guide.describe((image_hw[0] // f, image_hw[1] // f))
    if method == "fouriscale":
        from ldm.baselines.fouriscale import FouriScaleGuidance, settings_from_args
        guide = FouriScaleGuidance(unet, settings_from_args(opt, model, base_latent, image_hw, f))
        return guide, guide.describe()
    raise ValueError(f"not a comparison method: {method}")
