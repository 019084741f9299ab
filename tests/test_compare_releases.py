"""The logic of the side-by-side comparison with the authors' pipelines (tools/compare_releases.py,
tools/release_models.py, tools/release_runner.py), without network, virtual environments or the releases:

* both sides get the same weights: the diffusers folder (loaded by diffusers' and transformers' own classes, as
  the releases load it) and this repository's checkpoint give the same UNet and decoder outputs, and the folder's
  tokenizer gives open_clip's token ids;
* the releases' requirements become the pins the docs name (what is left out, replaced, taken from this env);
* the two commands run the same case (size, steps, seed, prompt) and parse with their programs' own parsers;
* the table's ratios are ours / theirs.
"""
import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import compare_releases as cr  # noqa: E402
from tools import release_models as rm  # noqa: E402
from tools import release_runner  # noqa: E402

SCALECRAFTER_REQUIREMENTS = """diffusers==0.20.2
torch~=2.0.0
scipy~=1.9.1
omegaconf~=2.1.1
accelerate~=0.16.0
transformers~=4.25.1
tqdm
xformers~=0.0.18
einops"""
DEMOFUSION_REQUIREMENTS = """diffusers~=0.21.4
torch~=2.1.0
scipy~=1.11.3
omegaconf~=2.3.0
accelerate~=0.23.0
transformers~=4.34.0
tqdm
einops
matplotlib
gradio
gradio_imageslider"""


def test_release_pins():
    pins, dropped = cr.release_pins(SCALECRAFTER_REQUIREMENTS, "scalecrafter")
    assert pins == ["diffusers==0.20.2", "torch~=2.0.0", "scipy~=1.9.1", "omegaconf~=2.1.1", "accelerate~=0.16.0",
                    "transformers~=4.25.1", "tqdm", "einops", "huggingface_hub==0.25.2", "numpy<2"]
    assert [line for line, _ in dropped] == ["xformers~=0.0.18"]
    pins, dropped = cr.release_pins(DEMOFUSION_REQUIREMENTS, "demofusion", torch_mode="project")
    assert pins == ["diffusers~=0.21.4", "omegaconf~=2.3.0", "accelerate~=0.23.0", "transformers~=4.34.0", "tqdm",
                    "einops", "matplotlib", "huggingface_hub<0.26"]  # pipeline_demofusion_sdxl imports matplotlib
    assert sorted(line for line, _ in dropped) == sorted(["torch~=2.1.0", "scipy~=1.11.3", "gradio",
                                                          "gradio_imageslider"])
    # a release's own line for a package the comparison adds is replaced, not doubled
    pins, dropped = cr.release_pins("diffusers==0.20.2\nhuggingface_hub==0.20.0\n", "scalecrafter")
    assert pins == ["diffusers==0.20.2", "huggingface_hub==0.25.2", "numpy<2"]
    assert dropped == [("huggingface_hub==0.20.0", "replaced by huggingface_hub==0.25.2")]
    assert cr.env_key(["a", "b"], "pinned") == cr.env_key(["b", "a"], "pinned") != cr.env_key(["a"], "pinned")


def test_pip_command_offline():
    cmd = cr.pip_install_command("/e/bin/python", ["diffusers==0.20.2"], wheels="/w", constraints="/c.txt")
    assert cmd == ["/e/bin/python", "-m", "pip", "install", "--disable-pip-version-check", "-q", "--no-index",
                   "--find-links", "/w", "-c", "/c.txt", "diffusers==0.20.2"]


@pytest.mark.parametrize("case", list(cr.CASES))
def test_both_commands_run_the_same_case(case, tmp_path):
    from ldm.pipelines import txt2img
    model = {"config": tmp_path / "model.yaml", "ckpt": tmp_path / "model.safetensors",
             "diffusers": tmp_path / "diffusers"}
    for scale in ("full", "reduced"):
        spec, base, side = cr.CASES[case][scale]
        theirs = cr.runner_command("/env/bin/python", case, scale, "/rel", model["diffusers"], 3, 42, "cpu", 1)
        assert theirs[:2] == ["/env/bin/python", str(cr.RUNNER)]
        t = release_runner.parser().parse_args(theirs[2:])
        ours = txt2img.build_parser().parse_args(cr.ours_argv(case, scale, model, 3, 42, "cpu", tmp_path))
        assert (t.height, t.width, t.steps, t.seed, t.prompt, t.scale) == \
            (ours.H, ours.W, ours.steps, ours.seed, ours.prompt, ours.scale) == (side, side, 3, 42, cr.PROMPT, 7.5)
        assert t.negative_prompt == ours.negative_prompt == ""
        assert ours.method == cr.CASES[case]["release"]
        if case.startswith("freescale"):  # the cascade from the base size, doubling
            n = {"freescale-sdxl-2048": 2, "freescale-sdxl-4096": 3}[case]
            assert t.stages == [s for k in range(n) for s in (1024 * 2 ** k,) * 2]
            assert ours.freescale_config.endswith(f"sdxl_{side}x{side}.yaml")
        if case.startswith("scalecrafter"):  # the release's preset and ours of the same name
            assert Path(t.preset).name == Path(ours.scalecrafter_config).name
            assert side == 4 * base * 8  # the preset's ratio to the base size
        if case.startswith("demofusion"):
            assert (t.stride, t.view_batch) == (ours.df_stride, ours.df_view_batch) == (64, 16)
    gpu = cr.ours_argv(case, "full", model, 3, 42, "cuda", tmp_path)
    assert gpu[gpu.index("--precision") + 1] == "half"
    assert "float16" in cr.runner_command("p", case, "full", "/rel", "/m", 3, 42, "cuda", 1)


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    return rm.write_model("tiny-sdxl", tmp_path_factory.mktemp("tiny-sdxl"), base=16, seed=5)


def test_both_sides_hold_the_same_weights(written):
    """The release's view (diffusers' own classes on the folder) and ours (this repository's loader on the
    checkpoint) compute the same UNet and decoder outputs."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from ldm.checkpoint import load_model_from_config
    from ldm.modules.encoders.modules import ConcatTimestepEmbedderND
    from ldm.util import load_config_file
    d = written["diffusers"]
    assert json.loads((d / "unet" / "config.json").read_text())["sample_size"] == 16
    ref_unet = UNet2DConditionModel.from_pretrained(d / "unet").eval()
    ref_vae = AutoencoderKL.from_pretrained(d / "vae").eval()
    cfg = load_config_file(written["config"])
    assert cfg.model.params.image_size == 16
    model = load_model_from_config(cfg, written["ckpt"])
    g = torch.Generator().manual_seed(0)
    x, t, ctx = torch.randn(2, 4, 16, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 5, 64, generator=g)
    pooled, ids = torch.randn(2, 32, generator=g), torch.tensor([[64., 64, 0, 0, 64, 64], [128, 96, 8, 4, 64, 64]])
    with torch.no_grad():
        ref = ref_unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids})
        y = torch.cat([pooled, ConcatTimestepEmbedderND(256)(ids)], 1)
        ours = model.model.diffusion_model(x, t, context=ctx, y=y)
        assert (ours - ref.sample).abs().max() <= 1e-4 * ref.sample.abs().max()
        z = torch.randn(1, 4, 8, 8, generator=g)
        ref_img = ref_vae.decode(z).sample
        own_img = model.first_stage_model.decode(z)
        assert (own_img - ref_img).abs().max() <= 1e-4 * ref_img.abs().max()
        # a different seed gives different weights (the comparison above can fail)
        other = rm.random_tensors({"w": (4, 4)}, 6)["w"]
        assert not torch.equal(other, rm.random_tensors({"w": (4, 4)}, 5)["w"])


def test_tokenizer_files_give_open_clip_ids(written):
    import open_clip
    from transformers import CLIPTokenizer
    prompt = "a professional photograph of an astronaut riding a horse"
    expected = open_clip.tokenize([prompt])[0]
    expected = expected[: int((expected != 0).sum())].tolist()
    for sub in ("tokenizer", "tokenizer_2"):
        tok = CLIPTokenizer.from_pretrained(written["diffusers"] / sub)
        assert tok(prompt)["input_ids"] == expected
    index = json.loads((written["diffusers"] / "model_index.json").read_text())
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["scheduler"] == ["diffusers", "EulerDiscreteScheduler"]


def test_table_ratios_are_ours_over_theirs():
    row = {"case": "freescale-sdxl-2048", "release": "freescale", "release_label": "ali-vilab/FreeScale@d5a2256",
           "geometry": {"spec": "tiny-sdxl", "base_px": 1024, "side": 2048},
           "ours": {"image_s": 30.0, "image_cpu_s": 27.0, "unet_s": 20.0, "unet_elements": 12, "peak_rss_gib": 1.5},
           "theirs": {"image_s": 40.0, "image_cpu_s": 30.0, "unet_s": 25.0, "unet_elements": 12, "peak_rss_gib": 2.0}}
    failed = dict(row, case="demofusion-sdxl-2048", theirs={"error": "ImportError: x"})
    table = cr.render_table([row, failed], "cpu", "CPU", "python tools/compare_releases.py run", "reduced", 3)
    lines = table.splitlines()
    assert "| freescale-sdxl-2048 | tiny-sdxl (1024² → 2048²) | ali-vilab/FreeScale@d5a2256 | 30.00 | 40.00 | " \
           "0.75× | 27.00 | 30.00 | 0.90× | 20.00 | 25.00 | 0.80× | 12 / 12 | 1.50 | 2.00 | 0.75× |" in lines
    assert any(line.startswith("| demofusion-sdxl-2048 |") and "failed: theirs: ImportError: x" in line
               for line in lines)
    assert len({line.count("|") for line in lines if line.startswith("|")}) == 1  # every row has every column
    cuda = dict(row, ours=dict(row["ours"], peak_allocated_gib=9.0, peak_reserved_gib=10.0),
                theirs=dict(row["theirs"], peak_allocated_gib=12.0, peak_reserved_gib=16.0))
    gpu = cr.render_table([cuda], "cuda", "GPU", "c", "full", 3).splitlines()
    assert "| freescale-sdxl-2048 | tiny-sdxl (1024² → 2048²) | ali-vilab/FreeScale@d5a2256 | 30.00 | 40.00 | 0.75× | " \
           "20.00 | 25.00 | 0.80× | 12 / 12 | 9.00 (10.00) | 12.00 (16.00) | 0.75× |" in gpu
    assert all(line.count("|") == gpu[-1].count("|") for line in gpu if line.startswith("|"))


def test_result_line_and_peak_rss():
    assert cr.parse_result("noise\nRESULT {\"image_s\": 1.5}\n") == {"image_s": 1.5}
    assert cr.parse_result("Traceback ...") is None
    assert 0 < release_runner.peak_rss_gib() < 1024


def test_release_argument_errors():
    with pytest.raises(SystemExit, match="NAME=PATH"):
        cr.parse_releases(["scalecrafter"])
    with pytest.raises(SystemExit, match="NAME=PATH"):
        cr.parse_releases(["unknown=/x"])
    assert cr.parse_releases(["freescale=/x"]) == {"freescale": Path("/x")}


def test_scalecrafter_thresholds_follow_the_trajectory():
    """A preset's tau (written for 50 steps) for a shorter run: DDIM with steps_offset 1 and leading spacing has
    the 50 timesteps 981, 961, ..., 1; at 2 steps 501 and 1. Step 501 has 24 of the 50 above it (< 37: active),
    step 1 has 49 (not active): 1 step. At 50 steps the preset's own 37."""
    from diffusers import DDIMScheduler
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                      clip_sample=False, set_alpha_to_one=False, timestep_spacing="leading")
    assert release_runner.scaled_tau(s, 37, 50, 50) == 37
    assert release_runner.scaled_tau(s, 37, 50, 2) == 1
    assert release_runner.scaled_tau(s, 0, 50, 2) == 0
    # 5 steps: 801, 601, 401, 201, 1 have 9, 19, 29, 39, 49 of the 50 above them: 3 are below 37
    assert release_runner.scaled_tau(s, 37, 50, 5) == 3


def test_offline_requirements_leave_torch_to_the_machine():
    freeze = "accelerate==0.16.0\nnumpy==1.25.2\nnvidia-cublas-cu11==11.10.3.66\ntorch==2.0.1\ntriton==2.0.0\n" \
             "tokenizers==0.13.3\nscipy==1.9.3\n-e git+https://x#egg=y\nhuggingface-hub==0.25.2\n"
    assert cr.offline_requirements(freeze) == ["accelerate==0.16.0", "tokenizers==0.13.3", "huggingface-hub==0.25.2"]
    # what this environment has at the same version stays out; another version comes along
    assert cr.offline_requirements(freeze, {"Accelerate": "0.16.0", "tokenizers": "0.22.0"}) == \
        ["tokenizers==0.13.3", "huggingface-hub==0.25.2"]
