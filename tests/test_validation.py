"""Issue #26, reliability round 3 (items 4, 7, 8, 9, 11): every numeric input is checked where it enters (flags,
presets, table specs), presets are checked against a schema per method, everything checkable is checked before a
model loads, extreme aspect ratios run or are refused with a memory estimate, and a few smaller messages.

Every case ends in one message and exit code 2 with nothing written (or in a correct result). Fast: the demo model
(3 steps) or the tiny SD configs; most cases stop before a model is built (loading fails the test)."""
import argparse
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from conftest import REPO_ROOT, load_script
from ldm.errors import InputWarning, NonFiniteError, UsageError
from ldm.pipelines import txt2img as pipeline

txt2img = load_script("txt2img")
upscale = load_script("upscale")
DEMO_CONFIG = REPO_ROOT / "configs/demo/shapes32.yaml"
DEMO_CKPT = REPO_ROOT / "checkpoints/demo/shapes32.ckpt"
TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"


@pytest.fixture
def no_loading(monkeypatch):
    """The checks must come before the model is built: building it fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")
    monkeypatch.setattr(pipeline, "load_model_from_config", refuse)


def demo_args(out, *extra):
    return ["--config", DEMO_CONFIG, "--ckpt", DEMO_CKPT, "--outdir", out, "--prompt", "a red circle", "--steps", "3",
            "--H", "64", "--W", "64", "--skip_grid", *extra]


def run_cli(capsys, argv, main=None):
    """(exit code, stdout, stderr) of txt2img's main (or ``main``); argparse's exit is caught."""
    try:
        code = (main or txt2img.main)([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_refused(code, err, out_dir, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert "error: " in last, err
    for needle in needles:
        assert needle in last, (needle, last)
    assert not Path(out_dir).exists(), "something was written"


# ================================================================================================ item 4: numbers


class _Captured(Exception):
    pass


def _parser_of(script, monkeypatch):
    """The argparse parser a script's main() builds (captured at its parse_args call)."""
    seen = []

    def capture(self, *a, **k):
        seen.append(self)
        raise _Captured()
    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", capture)
        with pytest.raises(_Captured):
            load_script(script).main([])
    return seen[0]


def _all_parsers(monkeypatch):
    parsers = {"txt2img": pipeline.build_parser(), "upscale (x4)": upscale.build_parser(),
               "upscale (img2img)": upscale.build_img2img_parser()}
    for name in ("demo", "prepare_eval_set"):
        parsers[name] = load_script(name).build_parser()
    for name in ("eval_repetition", "benchmark_vae", "benchmark"):
        parsers[name] = _parser_of(name, monkeypatch)
    for action in parsers["benchmark"]._actions:  # its sub-commands
        if isinstance(action, argparse._SubParsersAction):
            parsers.update({f"benchmark {k}": v for k, v in action.choices.items()})
    return parsers


def test_every_float_flag_refuses_nan_and_inf(monkeypatch):
    """The class, not the examples: no numeric flag of the sampling scripts takes a plain ``float`` (which accepts
    nan and inf); each takes a range-checked number type that refuses them with a message."""
    from ldm.util import NumberRange
    checked = 0
    for name, parser in _all_parsers(monkeypatch).items():
        for action in parser._actions:
            assert action.type is not float, f"{name} {action.option_strings}: type=float accepts nan and inf"
            if isinstance(action.type, NumberRange):
                for bad in ("nan", "inf", "-inf", "NaN"):
                    with pytest.raises(argparse.ArgumentTypeError, match="not"):
                        action.type(bad)
                checked += 1
    assert checked >= 30  # txt2img's guidance scale, FreeU, each method's floats, the upscalers' ...


@pytest.mark.parametrize("args,flag", [
    (["--scale", "nan"], "--scale"), (["--scale", "inf"], "--scale"), (["--scale", "-inf"], "--scale"),
    (["--ddim_eta", "nan"], "--ddim_eta"),
    (["--freeu", "--freeu_b1", "nan"], "--freeu_b1"), (["--freeu", "--freeu_s2", "inf"], "--freeu_s2"),
    (["--freeu", "--freeu_b2", "-1"], "--freeu_b2"),
    (["--method", "freescale", "--cosine_scale", "nan"], "--cosine_scale"),
    (["--method", "freescale", "--cosine_scale", "-5"], "--cosine_scale"),
    (["--method", "freescale", "--cosine_scale_bg", "inf"], "--cosine_scale_bg"),
    (["--method", "demofusion", "--df_sigma", "nan"], "--df_sigma"),
    (["--method", "demofusion", "--df_sigma", "0"], "--df_sigma"),
    (["--method", "demofusion", "--df_cosine_scales", "nan", "1", "1"], "--df_cosine_scales"),
    (["--method", "demofusion", "--df_cosine_scales", "3", "1", "inf"], "--df_cosine_scales"),
    (["--method", "fouriscale", "--fouri_amp_guidance", "nan"], "--fouri_amp_guidance"),
    (["--method", "fouriscale", "--fouri_stopband", "nan"], "--fouri_stopband"),
    (["--method", "fouriscale", "--fouri_weak_dilation_div", "inf"], "--fouri_weak_dilation_div"),
    (["--method", "hidiffusion", "--hidiff_T1_ratio", "nan"], "--hidiff_T1_ratio"),
    (["--method", "sdsr", "--sr_scale", "nan"], "--sr_scale"),
    (["--method", "sdsr", "--sr_eta", "nan"], "--sr_eta"),
    (["--dilate", "nan", "--dilate_tau", "2"], "--dilate"),
])
def test_non_finite_flags_are_refused_before_loading(tmp_path, capsys, no_loading, args, flag):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, *args))
    assert_refused(code, err, out, f"argument {flag}")


@pytest.mark.parametrize("args,flag", [(["--scale_cfg", "nan"], "--scale_cfg"), (["--scale", "inf"], "--scale"),
                                       (["--eta", "nan"], "--eta")])
def test_upscale_x4_non_finite_flags(tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ["--image", "x.png", "--outdir", out, *args], upscale.main)
    assert_refused(code, err, out, f"argument {flag}")


@pytest.mark.parametrize("args,flag", [(["--scale_cfg", "nan"], "--scale_cfg"), (["--scale", "inf"], "--scale"),
                                       (["--strength", "nan"], "--strength")])
def test_upscale_img2img_non_finite_flags(tmp_path, capsys, args, flag):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, ["--method", "scalecrafter", "--image", "x.png", "--outdir", out, *args],
                           upscale.main)
    assert_refused(code, err, out, f"argument {flag}")


def _preset(tmp_path, source, name="p.yaml", drop=(), **values):
    """A copy of a shipped preset with keys replaced (YAML values as text) or dropped, next to the original's
    settings files (relative paths keep working)."""
    src = REPO_ROOT / source
    lines = [ln for ln in src.read_text().splitlines()
             if not any(ln.startswith(f"{k}:") for k in list(values) + list(drop))]
    path = src.parent / f".test-{tmp_path.name}-{name}"
    path.write_text("\n".join(lines + [f"{k}: {v}" for k, v in values.items()]) + "\n")
    return path


@pytest.fixture
def preset_copy(tmp_path):
    made = []

    def make(source, drop=(), **values):
        path = _preset(tmp_path, source, name=f"{len(made)}.yaml", drop=drop, **values)
        made.append(path)
        return path
    yield make
    for path in made:
        path.unlink()


@pytest.mark.parametrize("method,flag,source,values,needles", [
    ("freescale", "--freescale_config", "configs/freescale/demo_64x64.yaml", {"cosine_scale": "-5"},
     ["cosine_scale: -5", "a number >= 0"]),
    ("freescale", "--freescale_config", "configs/freescale/demo_64x64.yaml", {"scale": ".nan"},
     ["scale: nan", "a finite number"]),
    ("freescale", "--freescale_config", "configs/freescale/demo_64x64.yaml",
     {"freeu": "{b1: .nan, b2: 1.2, s1: 0.9, s2: 0.2}"}, ["freeu: ", "b1, b2, s1, s2"]),
    ("scalecrafter", "--scalecrafter_config", "configs/scalecrafter/demo_64x64.yaml", {"scale": ".inf"},
     ["scale: inf", "a finite number"]),
    ("scalecrafter", "--scalecrafter_config", "configs/scalecrafter/demo_64x64.yaml", {"eta": ".nan"},
     ["eta: nan", "in [0, 1]"]),
    ("fouriscale", "--fouri_config", "configs/fouriscale/demo_64x64.yaml", {"amp_guidance": ".nan"},
     ["amp_guidance: nan", "positive number"]),
    ("fouriscale", "--fouri_config", "configs/fouriscale/demo_64x64.yaml", {"stopband": ".inf"},
     ["stopband: inf", "in [0, 1]"]),
    ("fouriscale", "--fouri_config", "configs/fouriscale/demo_64x64.yaml", {"weak_dilation_div": "0.5"},
     ["weak_dilation_div: 0.5", ">= 1"]),
])
def test_non_finite_preset_values_are_refused(tmp_path, capsys, no_loading, preset_copy, method, flag, source,
                                              values, needles):
    path = preset_copy(source, **values)
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--method", method, flag, path))
    assert_refused(code, err, out, str(path), *needles)


@pytest.mark.parametrize("key,value,needle", [("scale", float("inf"), "a finite number"),
                                              ("scale", float("nan"), "a finite number"),
                                              ("eta", 2.0, "[0, 1]"),
                                              ("steps", 0, "a positive integer")])
def test_table_spec_sampler_numbers(tmp_path, key, value, needle):
    from ldm.evaluation import tables
    spec = {"name": "t", "title": "t", "images": 2, "seed": 1, "prompts": {"builtin": "shapes"},
            "models": {"demo": {"config": "configs/demo/shapes32.yaml", "ckpt": "checkpoints/demo/shapes32.ckpt"}},
            "sampler": {"steps": 3, "eta": 1.0, "scale": 3.0, "batch_size": 2, key: value},
            "columns": [{"id": "multi", "metric": "multi_object_rate"}],
            "rows": [{"id": "direct", "method": "direct", "size": [64, 64]}]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(tables.SpecError) as info:
        tables.load_spec(path)
    assert needle in str(info.value) and str(path) in str(info.value) and key in str(info.value)


# -- a non-finite latent: the sampler names the step, the pipeline writes nothing


class _Schedule:
    """The model the DDIM sampler needs for its schedule (SD's scaled-linear betas), with a UNet stand-in."""
    parameterization = "eps"
    num_timesteps = 1000

    def __init__(self):
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        ac = torch.cumprod(1 - betas, 0)
        self.betas, self.alphas_cumprod = betas.float(), ac.float()
        self.alphas_cumprod_prev = torch.cat([torch.ones(1), ac[:-1]]).float()


def test_sampler_names_the_first_non_finite_step():
    from ldm.samplers import make_sampler
    sampler = make_sampler("ddim", _Schedule())
    steps, bad_from = 5, 3

    def guidance(model, x, t, cond, uncond, scale, step):  # finite until step index 3, then NaN everywhere
        out = torch.zeros_like(x)
        return out + float("nan") if step >= bad_from else out
    with pytest.raises(NonFiniteError) as info:
        sampler.run(steps, None, None, 1.0, batch_size=1, shape=(4, 8, 8), guidance=guidance,
                    generator=torch.Generator().manual_seed(0))
    # DDIM's uniform spacing of 1000 timesteps: every 1000 // 5 = 200, shifted by one, in sampling order 801 ... 1;
    # step index 3 is the 4th step
    expected_t = [1 + 200 * k for k in range(4, -1, -1)][bad_from]
    assert f"at sampling step {bad_from + 1} of {steps} (timestep {expected_t})" in str(info.value)
    assert isinstance(info.value, UsageError)
    # one bad value is enough; a finite run returns its latent
    ok = sampler.run(steps, None, None, 1.0, batch_size=1, shape=(4, 8, 8), guidance=lambda m, x, *a: x * 0)
    assert torch.isfinite(ok).all()


def test_overflowing_guidance_writes_nothing(tmp_path, capsys):
    """--scale 1e38 is finite but overflows the first guided prediction: the run stops with the step, writes no
    PNG and leaves no empty folders."""
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, demo_args(out, "--scale", "1e38"))
    assert code == 2 and "Traceback" not in err, err
    assert "error: the latent became NaN or infinite at sampling step" in err and "of 3 (timestep" in err
    assert not out.exists()


@pytest.mark.parametrize("name", ["euler", "euler_a", "heun", "dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_every_sampler_names_the_first_non_finite_step(name):
    """The same check on the samplers over sigmas (ldm/samplers/kdiff.py): NaN from the guided prediction of step
    index 2 on is reported as step 3, whatever the solver (Heun calls the model twice per step)."""
    from ldm.samplers import make_sampler
    model = _Schedule()
    model.device = "cpu"
    sampler = make_sampler(name, model)
    steps, bad_from = 5, 2

    def guidance(model, x, t, cond, uncond, scale, step):
        out = torch.zeros_like(x)
        return out + float("nan") if step >= bad_from else out
    with pytest.raises(NonFiniteError) as info:
        sampler.run(steps, None, None, 1.0, batch_size=1, shape=(4, 8, 8), guidance=guidance,
                    generator=torch.Generator().manual_seed(0))
    assert f"at sampling step {bad_from + 1} of {steps} (timestep {sampler.timesteps(steps)[bad_from]})" in \
        str(info.value)


def test_nan_decoded_images_are_refused():
    with pytest.raises(UsageError, match="decoded images hold NaN"):
        pipeline.check_decoded(torch.tensor([[0.0, float("nan")]]))
    x = torch.zeros(1, 3, 2, 2)
    assert pipeline.check_decoded(x) is x


# ================================================================================================ item 7: presets


def test_every_shipped_preset_passes_its_schema_and_names_its_model():
    from ldm import methods
    from ldm.util import BASE_MODELS
    n = 0
    for name, flag in methods.preset_flags().items():
        cls = methods.method_class(name)
        folders = [REPO_ROOT / "configs" / cls.preset_dir]
        for path in sorted(p for f in folders for p in f.glob("*.yaml")) + sorted(
                (REPO_ROOT / "configs/tables/presets").glob(f"{'freescale_' if name == 'freescale' else ''}*.yaml")):
            if name == "fouriscale" and "tables" in str(path):
                continue
            if name == "scalecrafter" and path.name.startswith("freescale_"):
                continue
            preset = cls.read_preset(path)
            assert preset["base_model"] in BASE_MODELS, path
            family = "sdxl" if path.name.startswith(("sdxl", "freescale_sdxl")) else \
                "demo" if path.name.startswith("demo") else "sd1" if "sd1.5" in path.name else "sd2"
            assert preset["base_model"] == family, path  # the file name says which model it is for
            n += 1
    assert n >= 50


@pytest.mark.parametrize("source,values,drop,needles", [
    # an empty preset would run plain sampling under the name scalecrafter
    ("configs/scalecrafter/demo_64x64.yaml", {}, ("dilate_settings", "dilate_tau", "progressive"),
     ["dilate_settings is required"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"dilate_tau": "0"}, (), ["dilate_tau: 0 is not a positive integer"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"dilate_tau": "-3"}, (), ["dilate_tau: -3"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"ndcfg_tau": "15"}, (), ["ndcfg_tau: 15 has no effect without "
                                                                         "ndcfg_dilate_settings"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"ndcfg_dilate_settings": "settings/demo/inner_x2.txt"}, (),
     ["ndcfg_dilate_settings is given without ndcfg_tau"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"inflate_tau": "0"}, (), ["inflate_tau", "disperse_tau"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"progressive": '"no"'}, (), ["progressive: 'no' is not true or false"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"dead_names": "maybe"}, (), ["dead_names: 'maybe'", "error, warn"]),
    ("configs/scalecrafter/demo_64x64.yaml", {}, ("base_model",), ["base_model is required", "sd1, sd2, sdxl, demo"]),
    ("configs/scalecrafter/demo_64x64.yaml", {"base_model": "dmeo"}, (), ["base_model: 'dmeo'", "sd1, sd2, sdxl, demo"]),
    ("configs/freescale/demo_64x64.yaml", {"fast_mode": '"no"'}, (), ["fast_mode: 'no' is not true or false"]),
    ("configs/freescale/demo_128x128.yaml", {"stages": "[[32, 32], [128, 128], [64, 64]]"}, (),
     ["128x128 -> 64x64", "larger than the one before"]),
    ("configs/freescale/demo_64x64.yaml", {"blur": "gaussian"}, (), ["blur: 'gaussian'", "release, spatial"]),
    ("configs/freescale/demo_64x64.yaml", {"restart_step": "25"}, (), ["restart_step: 25 must be below steps (25)"]),
    ("configs/freescale/demo_64x64.yaml", {"method": "scalecrafter"}, (), ["method: 'scalecrafter'", "freescale"]),
    ("configs/fouriscale/demo_64x64.yaml", {"start_step": "16"}, (), ["start_step 16 is after stop_step 15"]),
    ("configs/fouriscale/demo_64x64.yaml", {"filter": "box"}, (), ["filter: 'box'", "release, symmetric, ideal"]),
    ("configs/fouriscale/demo_64x64.yaml", {"layers": "no_such_list.txt"}, (), ["layers: ", "no such file"]),
])
def test_presets_that_would_turn_the_method_off_or_change_it(tmp_path, capsys, no_loading, source, values, drop,
                                                             needles):
    method = source.split("/")[1]
    flag = {"scalecrafter": "--scalecrafter_config", "freescale": "--freescale_config",
            "fouriscale": "--fouri_config"}[method]
    path = _preset(tmp_path, source, drop=drop, **values)
    try:
        out = tmp_path / "out"
        code, _, err = run_cli(capsys, demo_args(out, "--method", method, flag, path))
        assert_refused(code, err, out, str(path), *needles)
    finally:
        path.unlink()


def test_model_family_tells_the_demo_model_apart():
    from omegaconf import OmegaConf
    family = {name: pipeline.model_family(OmegaConf.load(REPO_ROOT / path)) for name, path in {
        "demo": "configs/demo/shapes32.yaml", "sd1": "configs/stable-diffusion/v1-inference.yaml",
        "sd2": "configs/stable-diffusion/v2-inference.yaml", "sd2v": "configs/stable-diffusion/v2-inference-v.yaml",
        "sdxl": "configs/stable-diffusion/sdxl-base-inference.yaml", "tiny-sd1": "configs/tiny/tiny-sd1.yaml",
        "tiny-sd2": "configs/tiny/tiny-sd2.yaml", "tiny-sdxl": "configs/tiny/tiny-sdxl.yaml"}.items()}
    assert family == {"demo": "demo", "sd1": "sd1", "sd2": "sd2", "sd2v": "sd2", "sdxl": "sdxl", "tiny-sd1": "sd1",
                      "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
    for recipe in (REPO_ROOT / "configs/demo/recipe").glob("*.yaml"):
        assert pipeline.model_family(OmegaConf.load(recipe)) == "demo", recipe


@pytest.mark.parametrize("config,method,flag,preset,needles", [
    (DEMO_CONFIG, "scalecrafter", "--scalecrafter_config", "configs/scalecrafter/sd2.1_1024x1024.yaml",
     ["preset for sd2", "demo model", "configs/scalecrafter/demo_*.yaml"]),
    (DEMO_CONFIG, "freescale", "--freescale_config", "configs/freescale/sd1.5_1024x1024.yaml",
     ["preset for sd1", "demo model"]),
    (DEMO_CONFIG, "fouriscale", "--fouri_config", "configs/fouriscale/sd2.1_1024x1024.yaml",
     ["preset for sd2", "demo model", "configs/fouriscale/demo_*.yaml"]),
    (TINY_SD2, "scalecrafter", "--scalecrafter_config", "configs/scalecrafter/demo_64x64.yaml",
     ["preset for demo", "sd2 model", "configs/scalecrafter/sd2.1_*.yaml"]),
    (TINY_SD2, "freescale", "--freescale_config", "configs/freescale/demo_64x64.yaml", ["preset for demo"]),
    (TINY_SD2, "fouriscale", "--fouri_config", "configs/fouriscale/demo_64x64.yaml", ["preset for demo"]),
    (TINY_SD2, "scalecrafter", "--scalecrafter_config", "configs/scalecrafter/sd1.5_1024x1024.yaml",
     ["preset for sd1", "sd2 model"]),
])
def test_presets_run_only_on_their_model(tmp_path, capsys, no_loading, config, method, flag, preset, needles):
    out = tmp_path / "out"
    argv = demo_args(out, "--method", method, flag, REPO_ROOT / preset)
    argv[1] = config
    code, _, err = run_cli(capsys, argv)
    assert_refused(code, err, out, *needles)


@pytest.mark.parametrize("args,needles", [
    (["--method", "scalecrafter"], ["--method scalecrafter needs its settings"]),
    (["--dilate", "1", "--dilate_tau", "2"], ["--dilate 1 dilates nothing"]),
    (["--dilate", "2", "--dilate_tau", "0"], ["argument --dilate_tau", "positive integer"]),
    (["--scalecrafter_config", REPO_ROOT / "configs/scalecrafter/demo_64x64.yaml", "--dilate_tau", "5"],
     ["--dilate_tau: options of the command-line form"]),
    (["--scalecrafter_config", REPO_ROOT / "configs/scalecrafter/demo_64x64.yaml", "--disperse_tau", "5"],
     ["--disperse_tau 5", "has no disperse_settings"]),
    (["--dilate", "2", "--dilate_tau", "2", "--ndcfg_tau", "2"], ["--ndcfg_tau", "give --scalecrafter_config"]),
])
def test_scalecrafter_options_that_would_be_ignored(tmp_path, capsys, no_loading, args, needles):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, *args))
    assert_refused(code, err, out, *needles)


# ================================================================================================ item 8: before loading


def test_nan_factor_in_a_settings_file_is_refused_before_loading(tmp_path, capsys, no_loading, preset_copy):
    folder = REPO_ROOT / "configs/scalecrafter/settings/demo"
    settings = folder / f".test-{tmp_path.name}.txt"
    good = (folder / "inner_x2.txt").read_text().splitlines()
    name = good[-1].split(":")[0].strip()
    settings.write_text("\n".join(good + [f"{name}:nan"]) + "\n")
    try:
        path = preset_copy("configs/scalecrafter/demo_64x64.yaml", dilate_settings=f"settings/demo/{settings.name}")
        out = tmp_path / "out"
        code, _, err = run_cli(capsys, demo_args(out, "--scalecrafter_config", path))
        assert_refused(code, err, out, f"{settings}:{len(good) + 1}", "factor nan must be a finite number >= 1")
    finally:
        settings.unlink()


def test_parse_settings_file_checks_numbers_without_a_model(tmp_path):
    from ldm.unet_hooks.layers import SettingsError, parse_settings_file
    f = tmp_path / "s.txt"
    for bad, needle in (("a:inf", "finite"), ("a:0.5", ">= 1"), ("a:x", "not a number"), ("a", "module_name:factor")):
        f.write_text(f"# comment\n{bad}\n")
        with pytest.raises(SettingsError, match=needle):
            parse_settings_file(f)
    f.write_text("a.b:2 # two\n\nc:1.5\n")
    assert parse_settings_file(f) == [(1, "a.b", 2.0), (3, "c", 1.5)]
    with pytest.raises(SettingsError, match="is a folder"):
        parse_settings_file(tmp_path)


@pytest.mark.parametrize("args,needles", [
    (["--method", "freescale", "--restart_step", "10"], ["--restart_step 10 must be below --steps (3)"]),
    (["--method", "freescale", "--restart_step", "3"], ["--restart_step 3 must be below --steps (3)"]),
    (["--method", "fouriscale", "--fouri_layers", "no/such/list.txt"], ["--fouri_layers", "no such file"]),
    (["--method", "fouriscale", "--fouri_start_step", "5", "--fouri_stop_step", "2"], ["start_step <= stop_step"]),
])
def test_method_settings_checked_before_loading(tmp_path, capsys, no_loading, args, needles):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, *args))
    assert_refused(code, err, out, *needles)


def test_freescale_preset_restart_step_against_the_run(tmp_path, capsys, no_loading, preset_copy):
    """restart_step counts the steps a preset is written for (its steps:, placed on the run's trajectory); a preset
    without steps: counts the run's --steps."""
    path = preset_copy("configs/freescale/demo_64x64.yaml", drop=("steps",), restart_step="7")
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--freescale_config", path))
    assert_refused(code, err, out, f"--freescale_config {path}: restart_step: 7 must be below --steps (3)")
    path = preset_copy("configs/freescale/demo_64x64.yaml", restart_step="7")  # 7 of its 25 steps: fine at --steps 3
    settings = pipeline.plan_run(pipeline.build_parser().parse_args(
        [str(a) for a in demo_args(out, "--freescale_config", path)]))[-1]
    assert settings.values["freescale"].restart_step == 7 and settings.reference_steps == 25


# ================================================================================================ item 9: aspect ratios


def test_window_geometry_keeps_a_token_at_extreme_aspect_ratios():
    """64x512 on an SD model: stage scale (1, 8); the deepest levels of the 8x64 latent are 2x16 and 1x8 tokens. The
    release's arithmetic (windows sized from 128-token tiles) gives int(16 / 128) = 0 tokens there."""
    from ldm.methods.freescale.scale_fusion import window_geometry
    for grid in ((8, 64), (4, 32), (2, 16), (1, 8)):
        wh, ww, sh, sw, jh, jw = window_geometry(grid, (1, 8))
        # the window spans the short axis (sub-tile 16 of 128 rows at one row per 128/h), at least one token
        assert wh == max(int(16 * grid[0] / 128), 1) and ww == max(int(128 * grid[0] / 128), 1), (grid, wh, ww)
        assert min(wh, ww, sh, sw) >= 1


def test_freescale_at_64x512_on_the_tiny_sd_model(tmp_path, capsys, tiny_ckpts):
    config, ckpt = tiny_ckpts["sd2"]
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, ["--config", config, "--ckpt", ckpt, "--outdir", out, "--prompt", "x",
                                         "--steps", "3", "--H", "64", "--W", "512", "--method", "freescale",
                                         "--skip_grid"])
    assert code == 0, err
    from PIL import Image
    (png,) = (out / "samples").glob("*.png")
    assert Image.open(png).size == (512, 64)


def test_fouriscale_extreme_aspect_ratio_refused_by_its_memory_estimate(tmp_path, capsys, monkeypatch, no_loading):
    """64x4096 on the demo model: dilation max(ceil(64/32), ceil(4096/32)) = 128; UNet level 1 (64 channels, its
    up-path ResBlocks 64 + 96 = 160 wide) holds 32x2048 feature maps, padded to r x the level's 16x16 base with
    r = max(ceil(32/16), ceil(2048/16)) = 128, i.e. 2048x2048; in float32, 3 branches, ~5 copies: ~37.5 GiB."""
    import ldm.inference as inference
    expected = 5 * 3 * 1 * 160 * 2048 * 2048 * 4
    monkeypatch.setattr(inference, "available_memory", lambda device: (8 * 2 ** 30, "a test's 8 GiB"))
    out = tmp_path / "out"
    argv = demo_args(out, "--method", "fouriscale")
    argv[argv.index("--W") + 1] = "4096"
    code, _, err = run_cli(capsys, argv)
    assert_refused(code, err, out, "2048x2048", f"{expected / 2 ** 30:.1f} GiB", "8.0 GiB is available")
    # the estimate itself, from the settings (before loading)
    opt = pipeline.build_parser().parse_args([str(a) for a in argv])
    _, _, info, cls, settings = pipeline.plan_run(opt)
    assert cls.memory_estimate(settings, info, 1, scale=3.0)[0] == expected
    assert cls.memory_estimate(settings, info, 2, scale=1.0)[0] == expected // 3 * 2 * 2  # 2 branches, 2 images


def test_default_memory_estimates_from_the_sizes():
    """SD 2.x sizes (320 UNet channels at the latent's resolution, a 128-channel VAE decoder at the image's), float32:
    the largest single tensor of a direct run, of a decode in one piece, and of MultiDiffusion's window batches."""
    from ldm import methods
    from ldm.methods.base import ModelInfo, Settings
    info = ModelInfo(family="sd2", f=8, channels=4, base_latent=64, side=512, unet_channels=(320, 640, 1280, 1280),
                     decoder_channels=128)
    direct = methods.method_class("direct")
    size = Settings(size=(1024, 2048))
    assert direct.memory_estimate(size, info, 2, tiling={"sync_gn": True})[0] == 2 * 2 * 320 * 128 * 256 * 4
    assert direct.memory_estimate(size, info, 2, scale=1.0, tiling={"x": 1})[0] == 1 * 2 * 320 * 128 * 256 * 4
    assert direct.memory_estimate(size, info, 2, tiling={})[0] == 2 * 128 * 1024 * 2048 * 4  # decoded whole
    md = methods.method_class("multidiffusion")
    opt = pipeline.build_parser().parse_args(["--method", "multidiffusion", "--md_batch", "4"])
    settings = md.settings(opt, info, (4096, 4096))
    assert md.memory_estimate(settings, info, 1, tiling={"x": 1})[0] == 4 * 2 * 320 * 64 * 64 * 4  # 4 windows of 64²


def test_memory_check_lets_small_runs_through(tmp_path, capsys, monkeypatch):
    import ldm.inference as inference
    monkeypatch.setattr(inference, "available_memory", lambda device: (8 * 2 ** 30, "a test's 8 GiB"))
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--method", "fouriscale"))
    assert code == 0, err
    assert len(list((out / "samples").glob("*.png"))) == 1


def test_available_memory_reads_proc_meminfo():
    import ldm.inference as inference
    have = inference.available_memory(torch.device("cpu"))
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        kb = next(int(line.split()[1]) for line in meminfo.read_text().splitlines() if line.startswith("MemAvailable"))
        # MemAvailable moves between the two reads; a cgroup limit can only lower it
        assert have is not None and have[0] <= kb * 1024 * 1.5


# ================================================================================================ item 11: smaller


def test_sdsr_below_the_base_size_warns(tmp_path):
    from ldm import methods
    ckpt = tmp_path / "x4.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    opt = pipeline.build_parser().parse_args(["--method", "sdsr", "--sr_ckpt", str(ckpt),
                                              "--sr_config", str(REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml")])
    from omegaconf import OmegaConf
    info = pipeline.model_info(opt, OmegaConf.load(TINY_SD2), TINY_SD2)  # base 8 latent x 8 = 64 px
    cls = methods.method_class("sdsr")
    with pytest.warns(InputWarning, match=r"--method sdsr at 64x32: that is not above the base model's 64x64 .*"
                                          r"samples 64x64 and the x4 upscaler's 256x256 result is shrunk to 64x32"):
        settings = cls.settings(opt, info, (64, 32))
    assert settings.sample_size == (64, 64)  # sides rounded up to the upscaler's multiple (64 px), then x4, shrunk
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        assert cls.settings(opt, info, (256, 256)).sample_size == (64, 64)


def test_eval_fid_checks_out_before_computing(tmp_path, capsys, monkeypatch):
    eval_fid = load_script("eval_fid")
    monkeypatch.setattr(eval_fid, "evaluate_folders", lambda *a, **k: pytest.fail("features computed first"))
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, needle in ((blocker / "r.json", "is an existing file, not a folder"), (tmp_path, "is a folder")):
        assert eval_fid.main(["--gen", str(tmp_path), "--ref", str(tmp_path), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --out ") and needle in err, err


def test_tiled_decoding_on_the_demo_model_is_a_warned_no_op(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--tiled_decoding", "--tile_size", "16"))
    assert code == 0, err
    assert "warning: --tiled_decoding/--tile_size: " in err and "has no VAE" in err
    from PIL import Image
    (png,) = (out / "samples").glob("*.png")
    params = __import__("json").loads(Image.open(png).text["parameters"])
    assert params["tiled_decoding"] is None


def test_a_preset_size_is_named_by_the_preset(tmp_path, capsys, no_loading, preset_copy):
    path = preset_copy("configs/scalecrafter/sd2.1_1024x1024.yaml", height="1020")
    out = tmp_path / "out"
    argv = [a for a in demo_args(out, "--scalecrafter_config", path)]
    argv[1] = TINY_SD2
    del argv[argv.index("--H"):argv.index("--H") + 4]  # the size from the preset
    code, _, err = run_cli(capsys, argv)
    assert_refused(code, err, out, f"--scalecrafter_config {path}: height 1020 is not a multiple of 8")
    assert "--H" not in err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag", ["--from-file", "--config", "--sr_ckpt", "--init_image"])  # (--ckpt: diffusers)
def test_a_folder_given_for_a_file_is_named_a_folder(tmp_path, capsys, no_loading, flag):
    folder = tmp_path / "a_folder"
    folder.mkdir()
    out = tmp_path / "out"
    argv = demo_args(out)
    if flag in argv:
        argv[argv.index(flag) + 1] = folder
    else:
        method = {"--init_image": "freescale", "--sr_ckpt": "sdsr"}.get(flag)
        argv += (["--method", method] if method else []) + [flag, folder]
    code, _, err = run_cli(capsys, argv)
    assert code == 2 and "folder" in err.strip().splitlines()[-1] and "no such file" not in err, err
    assert not out.exists()


def test_options_of_another_method_are_still_refused(tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    code, _, err = run_cli(capsys, demo_args(out, "--method", "fouriscale", "--df_sigma", "0.5"))
    assert_refused(code, err, out, "--df_sigma: DemoFusion options; add --method demofusion")


def test_img2img_overflow_writes_nothing(tmp_path, capsys):
    from PIL import Image
    image = tmp_path / "in.png"
    Image.new("RGB", (32, 32), (200, 40, 40)).save(image)
    out = tmp_path / "out"
    argv = ["--method", "scalecrafter", "--dilate", "2", "--dilate_tau", "2", "--image", image, "--W", "64",
            "--config", DEMO_CONFIG, "--ckpt", DEMO_CKPT, "--steps", "3", "--strength", "1", "--outdir", out,
            "--prompt", "a red circle"]
    code, _, err = run_cli(capsys, argv + ["--scale_cfg", "1e38"], upscale.main)
    assert code == 2 and "the latent became NaN or infinite at sampling step" in err, err
    assert not out.exists()
    code, _, err = run_cli(capsys, argv, upscale.main)  # the same run with a usual scale writes its image
    assert code == 0 and len(list(out.glob("*.png"))) == 1, err
