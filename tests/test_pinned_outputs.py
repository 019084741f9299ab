"""Pinned outputs: what every method produces at commit 92a390f, through the command lines only.

Each case runs ``scripts/txt2img.py``, ``scripts/upscale.py`` or ``scripts/reproduce_table.py`` in-process
(``main(argv)``, exit code 0) and compares what it produced with ``tests/reference/pinned/<case>.npz``:

* every latent handed to the model's ``decode_first_stage``, in call order (final latents, the cascades' stage
  latents, SD+SR's and the x4 upscaler's latents), captured by wrapping that method on ``LatentDiffusion`` and on
  every subclass that overrides it (SDXL), one record per outermost call;
* every PNG written (file names, sizes and pixels as 4x4 block sums; not the PNG bytes: metadata may change);
* for the table row, the row's numbers in ``table.json``.

It guards a refactor of the layer above the model core (method registry, sampler contract, pipelines): no case
may change. The models: the tiny configs (configs/tiny/) with random weights, every weight drawn
(``make_random_state_dict(std=0.05)``: the default init keeps the zero output convolutions, whose prediction is 0
whatever the method), and the trained demo model (checkpoints/demo/shapes32.ckpt).

Re-record only when a change of the outputs is intended: ``python tests/reference/pinned/record.py`` (README.md
there: how and where the data was made, and the measurements behind the tolerances below).
"""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT, load_script

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: a second thread only waits (conftest)

PINNED = REPO_ROOT / "tests" / "reference" / "pinned"
RECORD_ENV = "PINNED_RECORD_DIR"  # set by record.py: write the outputs there instead of comparing

# Latents: |actual - expected| <= ATOL_REL * max|expected| + RTOL * |expected|, elementwise.
# float32 has eps = 1.2e-7. Another x86-64 CPU sums in another order (AVX-512, AVX2 or SSE kernels of ATen, MKL
# and oneDNN; another thread count), which changes results in the last bits, and four DDIM steps through a UNet
# (and a second model, a cascade) amplify that 10-100x: measured with those kernels forced on this machine, the
# largest difference is 2e-5 of the tensor's largest value (SD+SR), typically 3e-6 to 8e-6, at most 0.15 of this
# bound. Any real change is far above it: another seed >= 4900x the bound, --scale 5 -> 6 >= 17x, --scale + 0.001
# 2-20x on the demo model (on the tiny random models the prompt barely matters: their whole guidance term is only
# 50-500x the bound).
ATOL_REL = 1e-4
RTOL = 1e-4
# PNG pixels, as sums over 4x4 blocks (the random models' images are noise, incompressible: full arrays of every
# case would take 3 MB): a latent off in the last bits may round a pixel to the next level, so a block sum may
# differ by BLOCK**2 * PIXEL_LEVELS at most (measured: 2)
PIXEL_LEVELS = 1
BLOCK = 4
# The table row's numbers: shape statistics of the row's PNGs, where a pixel may round to the next level
# (measured: 7e-7 apart)
TABLE_RTOL, TABLE_ATOL = 1e-3, 1e-4

TINY = {name: REPO_ROOT / f"configs/tiny/tiny-{name}.yaml" for name in ("sd1", "sd2", "sdxl", "x4-upscaler")}
DEMO = (REPO_ROOT / "configs/demo/shapes32.yaml", REPO_ROOT / "checkpoints/demo/shapes32.ckpt")
SC, FS, FOURI, TP = (REPO_ROOT / "configs" / d for d in ("scalecrafter", "freescale", "fouriscale", "tables/presets"))

# txt2img: 2x the training side of each model (tiny: 64 px base, 128 px; demo: 32 px base, 64 px), few steps
T2I_TINY = ["--prompt", "a red house on a green hill under a blue sky", "--steps", "4", "--H", "128", "--W", "128",
            "--seed", "7", "--scale", "5", "--skip_grid"]
T2I_DEMO = ["--prompt", "a red circle", "--steps", "4", "--H", "64", "--W", "64", "--seed", "11", "--scale", "3",
            "--skip_grid"]
ETA1 = ["--ddim_eta", "1"]
SWEEP = ["--n_samples", "1", "--n_iter", "2", "--sweep"]  # two jobs of one image each, per-image seeds

X4 = ["--sr_config", TINY["x4-upscaler"], "--sr_ckpt", "{x4}"]

# case -> (script, model, argv after --config/--ckpt/--outdir); "{x4}": the x4 checkpoint, "{image_HxW}": an input.
# The tiny SD 1.x/2.x UNets have 4 levels: an 8x8 latent (their 64 px training size) is 1x1 at the deepest, where
# a GroupNorm group holds 2 values and float rounding is amplified chaotically (1e-2 between CPUs). Every UNet
# input of the SD cases is therefore >= 12 latent pixels a side (MultiDiffusion windows of 12, FreeScale from
# 96 px, HiDiffusion without RAU-Net's downsampling); the methods whose UNet inputs are 8x8 (DemoFusion's
# windows, SD+SR's base, RAU-Net) run on the tiny SDXL (3 levels: 2x2 at the deepest) and the demo model.
CASES = {
    # SD 2.x layout
    "t2i-sd2-direct-eta0-batch2": ("txt2img", "sd2", [*T2I_TINY, "--method", "direct", "--n_samples", "2"]),
    "t2i-sd2-direct-eta1-grid-negative": ("txt2img", "sd2", [*T2I_TINY[:-1], *ETA1, "--n_samples", "2",
                                                            "--negative_prompt", "a dark blurry photo"]),
    "t2i-sd2-direct-eta1-sweep": ("txt2img", "sd2", [*T2I_TINY, *ETA1, *SWEEP]),
    "t2i-sd2-scalecrafter-preset-disperse": ("txt2img", "sd2", [
        *T2I_TINY, *ETA1, "--scalecrafter_config", f"{SC}/sd2.1_2048x2048_disperse.yaml", "--ndcfg_tau", "3",
        "--disperse_tau", "2"]),
    "t2i-sd2-scalecrafter-flags-freeu": ("txt2img", "sd2", [
        *T2I_TINY, "--method", "scalecrafter", "--dilate", "2", "--dilate_tau", "3", "--dilate_skip", "1",
        "--freeu"]),
    "t2i-sd2-scalecrafter-progressive-sweep": ("txt2img", "sd2", [
        *T2I_TINY, "--H", "192", *ETA1, *SWEEP, "--dilate", "3", "--dilate_tau", "3", "--progressive_dilate"]),
    "t2i-sd2-freescale-stages": ("txt2img", "sd2", [*T2I_TINY, *ETA1, "--method", "freescale", "--freescale_stages",
                                                    "96x96", "128x128", "--save_stages"]),
    "t2i-sd2-freescale-sweep": ("txt2img", "sd2", [*T2I_TINY, *ETA1, *SWEEP, "--method", "freescale",
                                                   "--freescale_stages", "96x96", "128x128", "--cosine_scale", "3",
                                                   "--cosine_scale_bg", "0.5"]),
    "t2i-sd2-attn_scale": ("txt2img", "sd2", [*T2I_TINY, "--method", "attn_scale", "--attn_scale_variant",
                                              "release"]),
    "t2i-sd2-multidiffusion-eta1": ("txt2img", "sd2", [*T2I_TINY, *ETA1, "--method", "multidiffusion",
                                                       "--md_window", "12", "--md_stride", "4"]),
    "t2i-sd2-hidiffusion-window-attn": ("txt2img", "sd2", [*T2I_TINY, "--method", "hidiffusion",
                                                           "--no-hidiff_raunet"]),
    "t2i-sd2-fouriscale-eta1": ("txt2img", "sd2", [*T2I_TINY, *ETA1, "--method", "fouriscale", "--fouri_start_step",
                                                   "1", "--fouri_stop_step", "3", "--fouri_filter", "symmetric"]),
    # SD 1.x layout
    "t2i-sd1-direct-eta1": ("txt2img", "sd1", [*T2I_TINY, *ETA1]),
    "t2i-sd1-scalecrafter-preset": ("txt2img", "sd1", [*T2I_TINY, *ETA1, "--scalecrafter_config",
                                                       f"{SC}/sd1.5_1024x1024.yaml"]),
    "t2i-sd1-fouriscale-sweep": ("txt2img", "sd1", [*T2I_TINY, *ETA1, *SWEEP, "--method", "fouriscale"]),
    # SDXL layout
    "t2i-sdxl-direct-eta1": ("txt2img", "sdxl", [*T2I_TINY, *ETA1]),
    "t2i-sdxl-scalecrafter-preset-freeu": ("txt2img", "sdxl", [*T2I_TINY, "--scalecrafter_config",
                                                               f"{SC}/sdxl_2048x2048_corrected.yaml", "--freeu"]),
    "t2i-sdxl-scalecrafter-sweep": ("txt2img", "sdxl", [*T2I_TINY, *ETA1, *SWEEP, "--scalecrafter_config",
                                                        f"{SC}/sdxl_4096x4096_disperse_corrected.yaml"]),
    "t2i-sdxl-freescale-stages": ("txt2img", "sdxl", [*T2I_TINY, *ETA1, "--method", "freescale",
                                                      "--freescale_stages", "64x64", "128x128", "--save_stages"]),
    "t2i-sdxl-attn_scale": ("txt2img", "sdxl", [*T2I_TINY, "--method", "attn_scale"]),
    "t2i-sdxl-multidiffusion": ("txt2img", "sdxl", [*T2I_TINY, "--method", "multidiffusion", "--md_stride", "4"]),
    "t2i-sdxl-demofusion-stages": ("txt2img", "sdxl", [*T2I_TINY, *ETA1, "--method", "demofusion",
                                                       "--save_stages"]),
    "t2i-sdxl-demofusion-sweep": ("txt2img", "sdxl", [*T2I_TINY, *ETA1, *SWEEP, "--method", "demofusion"]),
    "t2i-sdxl-hidiffusion-eta1": ("txt2img", "sdxl", [*T2I_TINY, *ETA1, "--method", "hidiffusion"]),
    "t2i-sdxl-hidiffusion-sweep": ("txt2img", "sdxl", [*T2I_TINY, *ETA1, *SWEEP, "--method", "hidiffusion"]),
    "t2i-sdxl-fouriscale-amp": ("txt2img", "sdxl", [*T2I_TINY, "--method", "fouriscale", "--fouri_start_step", "1",
                                                    "--fouri_stop_step", "3", "--fouri_amp_guidance"]),
    "t2i-sdxl-sdsr": ("txt2img", "sdxl", [*T2I_TINY, "--method", "sdsr", *X4, "--sr_steps", "3",
                                          "--sr_noise_level", "50", "--sr_scale", "4"]),
    # the demo model and its presets (trained weights)
    "t2i-demo-direct-eta0": ("txt2img", "demo", [*T2I_DEMO]),
    "t2i-demo-scalecrafter-preset": ("txt2img", "demo", [*T2I_DEMO, *ETA1, "--scalecrafter_config",
                                                         f"{SC}/demo_64x64.yaml"]),
    "t2i-demo-scalecrafter-ndcfg-disperse-freeu": ("txt2img", "demo", [
        *T2I_DEMO, *ETA1, "--scalecrafter_config", f"{TP}/demo_64x64_ndcfg_disperse.yaml", "--ndcfg_tau", "3",
        "--disperse_tau", "2", "--freeu"]),
    "t2i-demo-freescale-preset": ("txt2img", "demo", [*T2I_DEMO, *ETA1, "--method", "freescale",
                                                      "--freescale_config", f"{FS}/demo_64x64.yaml"]),
    "t2i-demo-demofusion": ("txt2img", "demo", [*T2I_DEMO, *ETA1, "--method", "demofusion"]),
    "t2i-demo-fouriscale-preset": ("txt2img", "demo", [*T2I_DEMO, *ETA1, "--method", "fouriscale", "--fouri_config",
                                                       f"{FOURI}/demo_64x64.yaml", "--fouri_start_step", "1",
                                                       "--fouri_stop_step", "3"]),
    "t2i-demo-sdsr-sweep": ("txt2img", "demo", [*T2I_DEMO, *ETA1, *SWEEP, "--method", "sdsr", *X4, "--sr_steps",
                                                "2", "--sr_eta", "1"]),
    # scripts/upscale.py: the x4 upscaler (24x20 -> 48x40), img2img with each method (48x40 -> 96x80)
    "up-x4-sr": ("upscale", "x4-upscaler", ["--image", "{image_24x20}", "--prompt", "a red house", "--steps", "3",
                                            "--noise_level", "30", "--scale", "2", "--scale_cfg", "4", "--seed", "5",
                                            "--eta", "1"]),
    "up-sd2-scalecrafter": ("upscale", "sd2", ["--image", "{image_48x40}", "--method", "scalecrafter", "--prompt",
                                               "a red house", "--seed", "5", "--W", "80", "--steps", "4",
                                               "--strength", "0.7", "--scale_cfg", "3", "--dilate", "2",
                                               "--dilate_tau", "3"]),
    "up-sdxl-freescale": ("upscale", "sdxl", ["--image", "{image_48x40}", "--method", "freescale", "--prompt",
                                              "a red house", "--seed", "5", "--W", "80", "--steps", "4",
                                              "--strength", "0.75", "--scale_cfg", "3", "--ddim_eta", "1"]),
    "up-sdxl-demofusion": ("upscale", "sdxl", ["--image", "{image_48x40}", "--method", "demofusion", "--prompt",
                                               "a red house", "--seed", "5", "--W", "80", "--steps", "4",
                                               "--strength", "0.75", "--scale_cfg", "3"]),
    # scripts/reproduce_table.py: one row of configs/tables/demo.yaml, reduced (see reduced_demo_table)
    "table-demo-64_sc_disperse": ("reproduce_table", "demo", ["64_sc_disperse"]),
}


# ---------------------------------------------------------------------------------------------
# inputs


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{model: (config, checkpoint)}: the tiny configs with every weight drawn, and the demo model. The attention
    query and key weights are drawn 3x larger: at std 0.05 the attention logits are ~0.3 and attention is nearly
    uniform, so the methods that act on attention (attention scaling, MSW-MSA, scale fusion, Q/K sharing) and the
    prompt (through cross-attention) would barely change the outputs."""
    make = load_script("make_random_checkpoint")
    d = tmp_path_factory.mktemp("pinned_ckpts")
    out = {"demo": DEMO}
    for seed, (name, config) in enumerate(TINY.items(), start=21):
        sd = make.make_random_state_dict(OmegaConf.load(config), seed=seed, std=0.05)
        sd = {k: v * 3 if any(f".{a}.to_{w}." in k for a in ("attn1", "attn2") for w in "qk") else v
              for k, v in sd.items()}
        out[name] = (config, make.save_checkpoint(sd, d / f"{name}.ckpt"))
    return out


def input_image(path, h, w):
    """An h x w RGB image from integer arithmetic only (the same bytes on any machine)."""
    y, x = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    rgb = np.stack([(y * 5 + x) % 256, (x * 6 + 40) % 256, ((x * y) % 97) * 2 + 30], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def reduced_demo_table(d, row):
    """configs/tables/demo.yaml cut to ``row``, 2 images, 4 steps and the columns below, sampled in this process;
    the row's preset copied with its schedules scaled to 4 steps (a preset must match the table's step count)."""
    spec = yaml.safe_load((REPO_ROOT / "configs/tables/demo.yaml").read_text())
    spec.update(name="demo_pinned", images=2, sampler={**spec["sampler"], "steps": 4, "batch_size": 2})
    for key in ("cpu_run", "timing", "references"):  # cpu_run would sample in subprocesses, not in this one
        spec.pop(key, None)
    # no training-data reference (512 rendered images); no FD (2 images: a singular 13x13 covariance)
    spec["columns"] = [c for c in spec["columns"] if c.get("reference") != "train" and c["metric"] != "shape_fd"]
    spec["rows"] = [dict(r) for r in spec["rows"] if r["id"] == row]
    preset_path = REPO_ROOT / spec["rows"][0]["preset"]
    preset = yaml.safe_load(preset_path.read_text())
    for key in ("dilate_settings", "ndcfg_dilate_settings", "disperse_settings"):
        if preset.get(key):
            preset[key] = str((preset_path.parent / preset[key]).resolve())
    preset.update(steps=4, dilate_tau=3, ndcfg_tau=3, disperse_tau=2)
    (d / preset_path.name).write_text(yaml.safe_dump(preset, sort_keys=False))
    spec["rows"][0]["preset"] = str(d / preset_path.name)
    (d / "demo_pinned.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return d / "demo_pinned.yaml"


# ---------------------------------------------------------------------------------------------
# capture


def _model_classes():
    import ldm.models.diffusion.ddpm as ddpm
    import ldm.models.diffusion.sdxl  # noqa: F401  (registers SDXLDiffusion as a subclass)
    todo, seen = [ddpm.LatentDiffusion], []
    while todo:
        cls = todo.pop(0)
        seen.append(cls)
        todo.extend(c for c in cls.__subclasses__() if c not in seen)
    return seen


@pytest.fixture
def decoded(monkeypatch):
    """The latents handed to decode_first_stage, in call order (an override's call of its parent's method,
    SDXL's, is part of the same call)."""
    latents, depth = [], [0]

    def wrap(original):
        def decode_first_stage(self, z, **kwargs):
            if depth[0] == 0:
                latents.append(z.detach().to("cpu", torch.float32).clone())
            depth[0] += 1
            try:
                return original(self, z, **kwargs)
            finally:
                depth[0] -= 1
        return decode_first_stage

    for cls in _model_classes():
        if "decode_first_stage" in vars(cls):
            monkeypatch.setattr(cls, "decode_first_stage", wrap(vars(cls)["decode_first_stage"]))
    return latents


def run_case(name, models, tmp_path):
    """Run a case; returns {array name: array} of what it produced."""
    script, model, args = CASES[name]
    out = tmp_path / "out"
    result = {}
    if script == "reproduce_table":
        spec = reduced_demo_table(tmp_path, args[0])
        threads = torch.get_num_threads()
        try:
            code = load_script("reproduce_table").main([str(spec), "--out", str(out), "--no_cache",
                                                        "--kid_subsets", "10", "--device", "cpu"])
        finally:
            torch.set_num_threads(threads)
        assert code == 0, f"{name}: scripts/reproduce_table.py exit code {code}"
        doc = json.loads((out / "table.json").read_text())
        (row,) = doc["tables"][0]["rows"]
        for column in doc["tables"][0]["columns"]:
            for key in (column["id"], f"{column['id']}_std", f"{column['id']}_ci95"):
                if row.get(key) is not None:
                    result[f"table:{key}"] = np.asarray(row[key], dtype=np.float64)
        result["table:n"] = np.asarray(row["n"], dtype=np.float64)
        return result
    config, ckpt = models[model]
    subst = {"{x4}": models["x4-upscaler"][1], "{image_48x40}": input_image(tmp_path / "in48.png", 48, 40),
             "{image_24x20}": input_image(tmp_path / "in24.png", 24, 20)}
    argv = ["--config", config, "--ckpt", ckpt, "--outdir", out, *[subst.get(a, a) for a in args]]
    code = load_script(script).main([str(a) for a in argv])
    assert code == 0, f"{name}: scripts/{script}.py exit code {code}"
    return result


def written_images(folder):
    """{"image:<file>": 4x4 block sums (uint16), "size:<file>": [H, W]} of every PNG under ``folder``: the pixels
    of the random-weight models are noise, incompressible, and full arrays of all cases would be ~3 MB."""
    out = {}
    for p in sorted(folder.rglob("*.png")):
        px = np.asarray(Image.open(p).convert("RGB"), dtype=np.uint16)
        h, w = px.shape[:2]
        padded = np.zeros((-(-h // BLOCK) * BLOCK, -(-w // BLOCK) * BLOCK, 3), np.uint16)
        padded[:h, :w] = px
        hb, wb = padded.shape[0] // BLOCK, padded.shape[1] // BLOCK
        name = p.relative_to(folder).as_posix()
        out[f"image:{name}"] = padded.reshape(hb, BLOCK, wb, BLOCK, 3).sum(axis=(1, 3), dtype=np.uint16)
        out[f"size:{name}"] = np.asarray([h, w])
    return out


# ---------------------------------------------------------------------------------------------
# comparison


def latent_error(actual, expected):
    """max over elements of |a - e| / (ATOL_REL * max|e| + RTOL * |e|): <= 1 passes."""
    a, e = actual.double(), expected.double()
    bound = ATOL_REL * e.abs().max().clamp_min(1e-12) + RTOL * e.abs()
    return ((a - e).abs() / bound).max().item()


def compare(name, got, want):
    problems = []
    decodes = sorted(k for k in want if k.startswith("decode:"))
    got_decodes = sorted(k for k in got if k.startswith("decode:"))
    if decodes != got_decodes:
        problems.append(f"{len(got_decodes)} decode_first_stage calls, pinned {len(decodes)}")
    for key in sorted(set(want) & set(got)):
        a, e = got[key], want[key]
        if a.shape != e.shape:
            problems.append(f"{key}: shape {tuple(a.shape)}, pinned {tuple(e.shape)}")
        elif key.startswith("decode:"):
            err = latent_error(torch.from_numpy(a), torch.from_numpy(e))
            if not err <= 1.0:
                diff = np.abs(a.astype(np.float64) - e).max()
                problems.append(f"{key} {tuple(e.shape)}: max |diff| {diff:.3g} = {err:.3g} x the tolerance "
                                f"(max |pinned| {np.abs(e).max():.3g})")
        elif key.startswith("image:"):
            diff = np.abs(a.astype(np.int32) - e)
            if diff.max() > BLOCK ** 2 * PIXEL_LEVELS:
                n = int((diff > BLOCK ** 2 * PIXEL_LEVELS).sum())
                problems.append(f"{key}: {BLOCK}x{BLOCK} pixel block sums differ by up to {diff.max()} ({n} of "
                                f"{diff.size} by more than {BLOCK ** 2 * PIXEL_LEVELS})")
        elif key.startswith("size:"):
            if not np.array_equal(a, e):
                problems.append(f"{key}: {a.tolist()}, pinned {e.tolist()}")
        elif key.startswith("table:"):  # computed from the PNGs, where a pixel may round to the next level
            if not np.allclose(a, e, rtol=TABLE_RTOL, atol=TABLE_ATOL, equal_nan=True):
                problems.append(f"{key}: {a.tolist()}, pinned {e.tolist()}")
    for key in sorted(set(want) ^ set(got)):
        if not key.startswith("decode:"):
            problems.append(f"{key}: {'not written now' if key in want else 'not pinned'}")
    if problems:
        pytest.fail(f"case {name} differs from tests/reference/pinned/{name}.npz:\n  " + "\n  ".join(problems),
                    pytrace=False)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_pinned_output(name, models, decoded, tmp_path):
    got = run_case(name, models, tmp_path)
    got.update({f"decode:{i:03d}": z.numpy() for i, z in enumerate(decoded)})
    if CASES[name][0] != "reproduce_table":
        got.update(written_images(tmp_path / "out"))
    assert any(k.startswith("decode:") for k in got), f"{name}: nothing was decoded"
    record = os.environ.get(RECORD_ENV)
    if record:
        Path(record).mkdir(parents=True, exist_ok=True)
        np.savez_compressed(Path(record) / f"{name}.npz", **got)
        return
    path = PINNED / f"{name}.npz"
    assert path.is_file(), f"{path} is missing: record it with tests/reference/pinned/record.py"
    with np.load(path) as f:
        want = {k: f[k] for k in f.files}
    compare(name, got, want)


def test_every_pinned_file_is_a_case():
    if os.environ.get(RECORD_ENV):
        pytest.skip("recording")
    assert sorted(p.stem for p in PINNED.glob("*.npz")) == sorted(CASES)
