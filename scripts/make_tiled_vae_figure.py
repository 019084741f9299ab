#!/usr/bin/env python
"""Figure for the README: one latent decoded in full, tiled without GroupNorm sync, tiled with sync.

    python scripts/make_tiled_vae_figure.py                       # random-weight SD VAE, synthetic latent
    python scripts/make_tiled_vae_figure.py --ckpt checkpoints/v2-1_512-ema-pruned.ckpt --image photo.png

Without ``--ckpt`` the decoder is the full-size SD VAE architecture with random weights and the latent is
smooth large-scale structure plus noise (so that tiles differ in their statistics, as in a real image). A
random-weight decoder does not produce an image, but per-tile GroupNorm shifts its output tile by tile just
as it shifts a trained decoder's colours, so the effect is shown honestly. With ``--ckpt`` (an SD
checkpoint, first stage taken from it) and ``--image``, the image is encoded and its latent decoded.

Top row: the three decodes, all mapped to 8 bits with the same per-channel range (1st–99th percentile of
the full decode). Bottom row: |tiled − full| averaged over channels, white = the display range.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

CONFIG = REPO_ROOT / "configs/stable-diffusion/v2-inference.yaml"


def structured_latent(h, w, seed=0):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    base = torch.stack([3 * xx, 2 * yy, torch.sin(3 * xx), 3 * xx * yy])
    disk = ((xx - 0.3) ** 2 + (yy + 0.2) ** 2 < 0.15).float()
    base = base + 2.5 * disk[None]
    return base[None] + 0.5 * torch.randn(1, 4, h, w, generator=g)


def build_vae(ckpt=None):
    from ldm.util import instantiate_from_config, load_config_file
    cfg = load_config_file(CONFIG).model.params.first_stage_config
    torch.manual_seed(0)
    vae = instantiate_from_config(cfg).eval()
    if ckpt:
        from ldm.checkpoint import load_state_dict_file
        sd = load_state_dict_file(ckpt)
        sd = {k[len("first_stage_model."):]: v for k, v in sd.items() if k.startswith("first_stage_model.")}
        vae.load_state_dict(sd, strict=False)
    return vae


def to_uint8(x, lo, hi):
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    return (x[0].permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def label(img, text, height=34):
    canvas = Image.new("RGB", (img.width, img.height + height), "white")
    canvas.paste(img, (0, height))
    d = ImageDraw.Draw(canvas)
    for i, line in enumerate(text.split("\n")):
        d.text((4, 2 + 15 * i), line, fill="black")
    return canvas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ckpt", default=None, help="SD checkpoint to take the first stage from (default: random)")
    p.add_argument("--image", default=None, help="image to encode (with --ckpt); default: synthetic latent")
    p.add_argument("--latent", type=int, nargs=2, default=[32, 48], metavar=("H", "W"))
    p.add_argument("--tile_size", type=int, default=16, help="latent pixels; small, to show several tiles")
    p.add_argument("--out", default=str(REPO_ROOT / "docs/images/tiled_vae_comparison.png"))
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    vae = build_vae(args.ckpt)
    with torch.no_grad():
        if args.image:
            from ldm.image_io import read_rgb
            img = read_rgb(args.image, "--image")
            img = img.resize((img.width // 8 * 8, img.height // 8 * 8))
            x = torch.from_numpy(np.asarray(img)).permute(2, 0, 1)[None].float() / 127.5 - 1
            z = vae.encode_tiled(x, tile_size=64).mode()
        else:
            z = structured_latent(*args.latent)
        full = vae.decode(z)
        naive = vae.decode_tiled(z, tile_size=args.tile_size, overlap=0, sync_gn=False)
        sync = vae.decode_tiled(z, tile_size=args.tile_size)
    lo = torch.quantile(full.flatten(2), 0.01, dim=-1)[..., None, None]
    hi = torch.quantile(full.flatten(2), 0.99, dim=-1)[..., None, None]
    if args.ckpt:  # a trained decoder outputs [-1, 1]
        lo, hi = torch.full_like(lo, -1.0), torch.full_like(hi, 1.0)
    gain = 1.0 / (hi - lo).mean().item()
    rows = [[], []]
    which = "trained SD VAE" if args.ckpt else "SD VAE architecture, random weights"
    panels = [("full decode", full), ("tiled, per-tile GroupNorm, no overlap", naive),
              ("tiled, synchronized GroupNorm (ours)", sync)]
    for name, y in panels:
        e = (y - full).abs()
        txt = name if y is full else f"{name}\nmax|diff| {e.max():.1e}, mean {e.mean():.1e}"
        rows[0].append(label(Image.fromarray(to_uint8(y, lo, hi)), txt))
        d = (e.mean(1, keepdim=True) * gain).clamp(0, 1).repeat(1, 3, 1, 1)
        rows[1].append(label(Image.fromarray(to_uint8(d, 0.0, 1.0)),
                             "|tiled - full|, white = whole display range" if y is not full else f"{which}\n"
                             f"latent {z.shape[-2]}x{z.shape[-1]}, tile {args.tile_size}"))
    rows[1][0] = label(Image.new("RGB", rows[1][1].size[:1] + (rows[1][1].height - 34,), "white"),
                       f"{which}\nlatent {z.shape[-2]}x{z.shape[-1]}, tile_size {args.tile_size}")
    w, h = rows[0][0].size
    pad = 6
    sheet = Image.new("RGB", (3 * w + 4 * pad, 2 * h + 3 * pad), "white")
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            sheet.paste(im, (pad + c * (w + pad), pad + r * (h + pad)))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out, optimize=True)
    for name, y in panels[1:]:
        e = (y - full).abs()
        print(f"{name}: max {e.max():.3e} mean {e.mean():.3e}")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
