#!/usr/bin/env python
"""Draw where a method's per-step settings act along the noise trajectory, for several samplers and step counts
(docs/images/trajectory_clock.png, docs/samplers.md).

    python scripts/make_trajectory_figure.py [--out docs/images/trajectory_clock.png]

Each row is one run: a dot per UNet call at its timestep (left: pure noise, t = 999; right: t = 0), filled where the
setting is active. The settings are those of ScaleCrafter's SD 2.1 2048x2048 preset (re-dilation and noise-damped
guidance for the first 37 of its 50 steps) and FreeScale's SDXL 2048x2048 preset (its second stage restarts at step 15
of 50; restrained dilation for steps < 35), placed on each run by the trajectory clock (ldm/guidance.py): a run's
step is active while the preset's reference step at its timestep is below tau. The samplers' timesteps come from the
samplers themselves on SD's noise schedule (configs/tiny/tiny-sd2.yaml: the same betas as SD 2.1)."""
import argparse
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from ldm.guidance import TrajectoryClock, reference_timesteps  # noqa: E402
from ldm.samplers import make_sampler  # noqa: E402
from ldm.util import instantiate_from_config, load_config_file, no_weight_init  # noqa: E402

RUNS = [("DDIM, 50 steps", "ddim", 50), ("DDIM, 25 steps", "ddim", 25), ("Euler a, 30 steps", "euler_a", 30),
        ("DPM++ 2M Karras, 20 steps", "dpmpp_2m_karras", 20)]
SETTINGS = [  # (title, reference steps, predicate on the reference step: active?)
    ("ScaleCrafter sd2.1_2048x2048: re-dilation + noise-damped CFG, steps < 37 of 50", 50, lambda r: r < 37),
    ("FreeScale sdxl_2048x2048: stage 2 from step 15 of 50; restrained dilation, steps < 35", 50,
     lambda r: 15 <= r < 35),
]


def run_timesteps(model, name, steps):
    return [float(t) for t in make_sampler(name, model).timesteps(steps)]


def draw(model, out):
    width, left, right, row_h, head = 1100, 260, 30, 26, 34
    height = head + len(SETTINGS) * (head + len(RUNS) * row_h) + 40
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    try:
        font = ImageFont.load_default(size=13)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()

    def x_of(t):  # t = 999 at the left edge, 0 at the right
        return left + (999.0 - t) / 999.0 * (width - left - right)

    d.text((10, 8), "noise trajectory: timestep 999 (noise) -> 0 (image); filled = the setting acts at that UNet call",
           fill="black", font=font)
    y = head
    for title, ref_steps, active in SETTINGS:
        clock = TrajectoryClock(reference_timesteps(model.num_timesteps, ref_steps))
        d.text((10, y + 6), title, fill=(20, 20, 120), font=font)
        y += head
        for label, name, steps in RUNS:
            d.text((10, y + 5), label, fill="black", font=font)
            d.line([(left, y + row_h // 2), (width - right, y + row_h // 2)], fill=(200, 200, 200))
            for t in run_timesteps(model, name, steps):
                x, cy = x_of(t), y + row_h // 2
                on = active(clock.step_of(t))
                d.ellipse([x - 4, cy - 4, x + 4, cy + 4], fill=(200, 40, 40) if on else "white",
                          outline=(200, 40, 40) if on else (120, 120, 120))
            y += row_h
    for t in (999, 750, 500, 250, 0):
        d.text((x_of(t) - 10, y + 8), str(t), fill=(90, 90, 90), font=font)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    img.save(out)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO_ROOT / "docs/images/trajectory_clock.png"))
    opt = p.parse_args(argv)
    cfg = load_config_file(REPO_ROOT / "configs/tiny/tiny-sd2.yaml")
    with no_weight_init():
        model = instantiate_from_config(cfg.model).eval()
    print(f"wrote {draw(model, opt.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
