"""The samplers beyond DDIM (ldm/samplers/: Euler, Euler ancestral, Heun, DPM-Solver++(2M) [Karras], DPM-Solver++(2M)
SDE, UniPC) against k-diffusion's sampling functions and diffusers' schedulers, recorded on a tiny random UNet
(tests/reference/samplers/: README.md, make_oracle.py), and their sampler contract (ldm/samplers/base.py).

Neither library is needed here: the recorded sigmas, timesteps, start latents, per-step noise and final latents
are replayed through this repository's samplers.

Tolerance of the final latents: both sides run the same float32 UNet on the same inputs but order the update
arithmetic differently (float64 Python coefficients here, float32 tensors there; diffusers steps the DDPM x_t
= x_sigma * c_in for DPM-Solver/UniPC). An update rounds about four times on each side, so two runs part by about
8 * 2^-24 * M per model call (M = the largest |latent| of the run), and a difference that enters the UNet comes
out at most about twice as large (CFG scale 5 on a random UNet). Over E model calls (10 steps; 19 calls for
Heun): atol = 16 * E * 2^-24 * M, e.g. 4.8e-4 for M = 50 and 10 calls. The errors found are 0.02-0.26 of it
(euler_a/dpmpp_2m_sde, whose per-step noise enters at full scale, the largest). A real difference is far larger:
a solver of another order, one sigma off or one noise draw off moves the result by 100 tolerances or more
(``test_oracles_tell_solvers_apart``).
"""
import math

import numpy as np
import pytest
import torch

from conftest import REFERENCE_DIR, assert_within_ulps, tiny_sd1_oracle_unet
from ldm.samplers import SAMPLERS, make_sampler, sampler_class
from ldm.samplers.kdiff import SPACINGS, Denoiser, Loop, karras_sigmas, spaced_timesteps

pytestmark = pytest.mark.usefixtures("one_torch_thread")

REF = REFERENCE_DIR / "samplers" / "oracle.pt"
EPS32 = 2.0 ** -24
K_SAMPLERS = [n for n in SAMPLERS if n != "ddim"]


@pytest.fixture(scope="module")
def ref():
    return torch.load(REF, weights_only=True)


@pytest.fixture(scope="module")
def unet():
    weights = torch.load(REFERENCE_DIR / "hidiffusion" / "oracle_tiny.pt", weights_only=True)["weights"]
    return tiny_sd1_oracle_unet(weights)


class TinyModel:
    """What a sampler needs of LatentDiffusion: the schedule, the parameterisation and ``apply_model`` (with the
    recorded contexts, 16-dim, on the bare UNet)."""

    def __init__(self, unet, alphas_cumprod, parameterization):
        self.unet, self.parameterization = unet, parameterization
        self.alphas_cumprod = alphas_cumprod
        self.betas = 1 - alphas_cumprod / torch.cat([torch.ones(1), alphas_cumprod[:-1]])
        self.num_timesteps = len(alphas_cumprod)
        self.calls = []

    def apply_model(self, x, t, cond):
        self.calls.append((x, t))
        return self.unet(x, t, context=cond)


def model_calls(name, steps):
    return 2 * steps - 1 if name == "heun" else steps


def tolerance(name, steps, *tensors):
    m = max(float(t.abs().max()) for t in tensors)
    return 16 * model_calls(name, steps) * EPS32 * m


def replay_noise(sampler, noise):
    """Make ``sampler.noise`` hand out the recorded per-step noise (after the start noise, which run() is given)."""
    it = iter(noise)
    sampler.noise = lambda shape, device, generator=None: next(it).clone()


def case_ids(lib):
    data = torch.load(REF, weights_only=True)[lib]
    return sorted(data)


# -- the schedules ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("key", case_ids("diffusers"))
def test_schedule_matches_diffusers(ref, unet, key):
    """Timesteps and sigmas of every recorded diffusers scheduler configuration (SD's config, steps_offset 1)."""
    name, spacing, param = key.split("/")
    e = ref["diffusers"][key]
    sampler = make_sampler(name, TinyModel(unet, ref["alphas_cumprod"], param),
                           spacing=None if name == "dpmpp_2m_karras" else spacing)
    sigmas, ts = sampler.schedule(ref["steps"])
    theirs = e["timesteps"].numpy()
    if sampler.spacing == "karras":  # diffusers gives the model round(t); k-diffusion (and this repo) t itself
        assert np.array_equal(np.round(ts), theirs)
        assert sampler.timesteps(ref["steps"]) == [int(t) for t in theirs]
    elif spacing == "linspace" and name in ("euler", "euler_a", "heun"):  # fractional t, float32 there
        np.testing.assert_allclose(ts, theirs, rtol=0, atol=1e3 * EPS32)  # half an ulp of float32 at t < 1000
    else:
        assert ts.tolist() == theirs.tolist()
    # both from the same float32 alphas_cumprod: sqrt((1 - a) / a) rounded once here (float64 -> float32), a few
    # float32 roundings there (and Karras' power in float32 / float64): within 8 ulp
    assert_within_ulps(sigmas, e["sigmas"], 8, key)
    if e["holds"] == "x_sigma" and spacing == "leading":
        # diffusers starts "leading" runs at noise * sqrt(sigma_0^2 + 1): this repository's start_latent for all
        assert e["init_noise_sigma"] == pytest.approx(math.sqrt(float(sigmas[0]) ** 2 + 1), rel=4 * EPS32)


@pytest.mark.parametrize("key", case_ids("kdiff"))
def test_schedule_matches_kdiffusion(ref, unet, key):
    name, spacing, param = key.split("/")
    sampler = make_sampler(name, TinyModel(unet, ref["alphas_cumprod"], param), spacing=spacing)
    sigmas, ts = sampler.schedule(ref["steps"])
    e = ref["kdiff"][key]
    assert_within_ulps(sigmas, e["sigmas"], 8, key)
    if spacing == "leading":  # k-diffusion's quantized sigma_to_t gave back the discrete timesteps exactly
        assert ts.tolist() == e["t"][:ref["steps"]].tolist() or name == "heun"
    else:  # its interpolated sigma_to_t in float32: 1e-3 of a timestep (log sigma's float32 rounding, / its slope)
        first_stage = e["t"][0::2] if name == "heun" else e["t"]
        np.testing.assert_allclose(ts, first_stage.numpy()[:ref["steps"]], rtol=0, atol=1e-3)


def test_spacings_by_hand():
    """The spacings for S = 10 of T = 1000, written out (diffusers' documented definitions)."""
    assert spaced_timesteps("leading", 10, 1000).tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert spaced_timesteps("leading", 10, 1000, multistep_grid=True).tolist() == \
        [90 * k + 1 for k in range(10, 0, -1)]  # T // (S + 1) = 90
    assert spaced_timesteps("trailing", 10, 1000).tolist() == [999, 899, 799, 699, 599, 499, 399, 299, 199, 99]
    assert spaced_timesteps("linspace", 10, 1000).tolist() == pytest.approx([111 * k for k in range(9, -1, -1)])
    assert spaced_timesteps("linspace", 4, 1000, multistep_grid=True).tolist() == [999, 749, 500, 250]
    s = karras_sigmas(3, 0.1, 10.0)
    assert s[0] == pytest.approx(10.0) and s[-1] == pytest.approx(0.1)
    assert s[1] == pytest.approx(((10 ** (1 / 7) + 0.1 ** (1 / 7)) / 2) ** 7)


# -- whole runs through the contract ----------------------------------------------------------------------------

def x_sigma(e):
    """The recorded start latent as x_sigma (diffusers' DPM-Solver/UniPC hold x_t = x_sigma * c_in)."""
    return e["x"] * math.sqrt(float(e["sigmas"][0]) ** 2 + 1) if e.get("holds") == "x_t" else e["x"]


def run_case(ref, unet, lib, key):
    name, spacing, param = key.split("/")
    e = ref[lib][key]
    steps = ref["steps"]
    model = TinyModel(unet, ref["alphas_cumprod"], param)
    sampler = make_sampler(name, model, spacing=None if name == "dpmpp_2m_karras" else spacing)
    x_T = sampler.start_latent(ref["noise"], steps)
    # the start convention: the recorded start latent (x_sigma), or diffusers' DDPM x_t = noise for DPM/UniPC;
    # sigma_0 within 8 ulp of theirs (test_schedule_*), then a product and a square root: 16 ulp
    torch.testing.assert_close(x_T, x_sigma(e), rtol=16 * EPS32, atol=0)
    if sampler.stochastic:
        replay_noise(sampler, ref["step_noise"])
    out = sampler.run(steps, ref["cond"], ref["uncond"], ref["scale"], batch_size=1, x_T=x_T)
    return name, out, e


@pytest.mark.parametrize("key", case_ids("kdiff"))
def test_run_matches_kdiffusion(ref, unet, key):
    """sampler.run on our schedule vs k-diffusion's sampling function on its CompVis(V)Denoiser."""
    name, out, e = run_case(ref, unet, "kdiff", key)
    tol = tolerance(name, ref["steps"], e["x"], e["out"])
    err = float((out - e["out"]).abs().max())
    assert err <= tol, f"{key}: max |ours - k-diffusion| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("key", [k for k in case_ids("diffusers") if not k.startswith("dpmpp_2m_karras")])
def test_run_matches_diffusers(ref, unet, key):
    """sampler.run on our schedule vs the diffusers scheduler stepped as its SD pipeline does."""
    name, out, e = run_case(ref, unet, "diffusers", key)
    tol = tolerance(name, ref["steps"], x_sigma(e), e["out"])
    err = float((out - e["out"]).abs().max())
    assert err <= tol, f"{key}: max |ours - diffusers| = {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("param", ["eps", "v"])
def test_karras_solver_matches_diffusers(ref, unet, param):
    """diffusers' Karras DPM-Solver++ gives the model round(t) while stepping the exact Karras sigmas; the solver
    replayed on its sigmas and timesteps."""
    e = ref["diffusers"][f"dpmpp_2m_karras/leading/{param}"]
    cls = sampler_class("dpmpp_2m_karras")
    model = TinyModel(unet, ref["alphas_cumprod"], param)
    ts = e["timesteps"].numpy()
    den = Denoiser(model, None, ref["cond"], ref["uncond"], ref["scale"], e["sigmas"], ts)
    x = x_sigma(e)
    with torch.no_grad():
        out = cls.solver(den, x, e["sigmas"], Loop(0, ref["steps"], ts))
    tol = tolerance("dpmpp_2m", ref["steps"], x, e["out"])
    assert float((out - e["out"]).abs().max()) <= tol


def test_oracles_tell_solvers_apart(ref, unet):
    """The tolerance is far below the differences it must catch: each solver's output against the oracle of a
    neighbouring solver (same schedule, same noise) is at least 100 tolerances off."""
    pairs = [("euler", "heun"), ("dpmpp_2m", "unipc"), ("dpmpp_2m", "euler"), ("euler_a", "euler"),
             ("dpmpp_2m_sde", "dpmpp_2m")]
    for ours, other in pairs:
        key = f"{other}/leading/eps"
        lib = "kdiff" if key in ref["kdiff"] else "diffusers"
        _, out, _ = run_case(ref, unet, lib, f"{ours}/leading/eps")
        e = ref[lib][key]
        tol = tolerance(other, ref["steps"], x_sigma(e), e["out"])
        assert float((out - e["out"]).abs().max()) > 100 * tol, (ours, other)


# -- the contract -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(ref, unet):
    return TinyModel(unet, ref["alphas_cumprod"], "eps")


def recording_guidance(log):
    def guidance(model, x, t, cond, uncond, scale, step):
        log.append((step, t.clone(), x.clone()))
        return torch.zeros_like(x) + 0.1 * x  # cheap and deterministic: no UNet
    return guidance


@pytest.mark.parametrize("name", K_SAMPLERS)
def test_guidance_calls(tiny, name):
    """Which (step, t, x_t) the guidance sees: one call per step with t_i (Heun: a second call with the same
    step index at t_{i+1}, none for the last step's second stage), x_t = x_sigma * c_in."""
    steps = 6
    log = []
    sampler = make_sampler(name, tiny, spacing="leading" if name != "dpmpp_2m_karras" else None)
    sigmas, ts = sampler.schedule(steps)
    x_T = sampler.start_latent(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0)), steps)
    sampler.run(steps, None, None, 1.0, batch_size=1, x_T=x_T, guidance=recording_guidance(log),
                generator=torch.Generator().manual_seed(1))
    if name == "heun":
        expected = [(i, j) for i in range(steps) for j in ((i, i + 1) if i < steps - 1 else (i,))]
    else:
        expected = [(i, i) for i in range(steps)]
    assert [s for s, _, _ in log] == [i for i, _ in expected]
    for (step, t, _), (_, j) in zip(log, expected):
        assert float(t[0]) == pytest.approx(float(ts[j]), abs=1e-3)
    # the first call sees x_T * c_in(sigma_0): the DDPM latent, unit variance for a run from noise
    c_in = 1 / math.sqrt(float(sigmas[0]) ** 2 + 1)
    torch.testing.assert_close(log[0][2], x_T * c_in, rtol=4 * EPS32, atol=0)
    for _, t, _ in log:  # DDIM's long timesteps where t is whole (always for leading/trailing), else float32
        assert t.dtype == (torch.long if float(t[0]).is_integer() else torch.float32)
        assert t.dtype == torch.long or sampler.spacing in ("linspace", "karras")


@pytest.mark.parametrize("name", K_SAMPLERS)
def test_contract_timesteps_noised_start(tiny, name):
    sampler = make_sampler(name, tiny)
    sigmas, ts = sampler.schedule(8)
    assert sampler.timesteps(8) == [int(round(t)) for t in ts]
    assert all(isinstance(t, int) for t in sampler.timesteps(8))
    x0, n = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(sampler.noised(x0, 8, 3, n), x0 + float(sigmas[3]) * n, rtol=0, atol=0)
    assert float(sigmas[-1]) == 0 and bool((sigmas[:-1] > 0).all()) and bool((sigmas[:-2] > sigmas[1:-1]).all())
    torch.testing.assert_close(sampler.start_latent(n, 8), n * math.sqrt(float(sigmas[0]) ** 2 + 1))
    d = sampler.describe()
    assert d["sampler"] == sampler.label and d["spacing"] == sampler.spacing


@pytest.mark.parametrize("name", ["euler_a", "dpmpp_2m_sde", "euler", "unipc"])
def test_batch_rows_independent(tiny, name):
    """Per-row generators: row i of a batch of 2 is the image that generator i alone gives (start and per-step
    noise, ancestral/SDE included)."""
    sampler = make_sampler(name, tiny)
    guidance = recording_guidance([])

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sampler.run(5, None, None, 1.0, batch_size=len(seeds), shape=(4, 4, 4), guidance=guidance,
                           generator=gens)
    both = run([11, 12])
    torch.testing.assert_close(both[1:], run([12]), rtol=0, atol=0)
    torch.testing.assert_close(both[:1], run([11]), rtol=0, atol=0)
    assert not torch.equal(both[0], both[1])


@pytest.mark.parametrize("name", ["euler", "heun", "euler_a"])
def test_restart_from_held_latent(tiny, name):
    """start_step k with x_T = the latent the full run held at step k (read through pre_step) gives the full
    run's result: x_T and pre_step are in the sampler's own parameterisation (history-free solvers)."""
    sampler = make_sampler(name, tiny, eta=0.0)
    guidance = recording_guidance([])
    held = {}

    def pre(x, i, t):
        held[i] = x.clone()
        assert t.dtype == torch.long and int(t[0]) == sampler.timesteps(6)[i]
        return x
    x_T = sampler.start_latent(torch.randn(1, 4, 4, 4), 6)
    full = sampler.run(6, None, None, 1.0, batch_size=1, x_T=x_T, guidance=guidance, pre_step=pre)
    again = sampler.run(6, None, None, 1.0, batch_size=1, x_T=held[3], guidance=guidance, start_step=3)
    torch.testing.assert_close(again, full, rtol=0, atol=0)


def test_eta_zero_is_deterministic(tiny):
    """Euler ancestral with eta 0 is Euler; DPM++ 2M SDE with eta 0 is DPM++ 2M (the algebra, exactly)."""
    g = recording_guidance([])
    x_T = torch.randn(1, 4, 4, 4)
    for sde, ode in (("euler_a", "euler"), ("dpmpp_2m_sde", "dpmpp_2m")):
        a = make_sampler(sde, tiny, eta=0.0).run(6, None, None, 1.0, batch_size=1, x_T=x_T, guidance=g)
        b = make_sampler(ode, tiny).run(6, None, None, 1.0, batch_size=1, x_T=x_T, guidance=g)
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_bad_options(tiny):
    with pytest.raises(ValueError, match="spacing"):
        make_sampler("euler", tiny, spacing="uniform")
    with pytest.raises(ValueError, match="eta"):
        make_sampler("euler_a", tiny, eta=-1)
    with pytest.raises(ValueError, match="x_T"):
        make_sampler("euler", tiny).run(5, None, None, 1.0, batch_size=1, shape=(4, 4, 4), start_step=2)
    with pytest.raises(ValueError, match="steps_offset"):
        make_sampler("euler", tiny, steps_offset=200).schedule(10)
    assert set(SPACINGS) == {"leading", "trailing", "linspace", "karras"}


# -- the pipelines' options -------------------------------------------------------------------------------------

def parse(*argv):
    from ldm.pipelines import txt2img
    return txt2img.build_parser().parse_args(list(argv))


@pytest.mark.parametrize("argv, words", [
    (["--spacing", "karras"], ["--spacing karras", "DDIM", "leading"]),
    (["--eta", "1"], ["--eta 1", "euler_a", "--ddim_eta"]),
    (["--sampler", "euler_a", "--ddim_eta", "1"], ["--ddim_eta 1", "DDIM's", "--eta"]),
    (["--sampler", "heun", "--eta", "0.5"], ["--eta 0.5", "heun", "no noise"]),
    (["--sampler", "dpmpp_2m_sde", "--eta", "-1"], ["--eta -1", ">= 0"]),
])
def test_sampler_flags_refused(argv, words):
    from ldm.errors import UsageError
    from ldm.samplers import options_of
    with pytest.raises(UsageError) as err:
        options_of(parse(*argv))
    for w in words:
        assert w in str(err.value)


def test_sampler_flags_accepted():
    from ldm.samplers import options_of
    assert options_of(parse()) == ("ddim", {"eta": 0.0})
    assert options_of(parse("--ddim_eta", "1")) == ("ddim", {"eta": 1.0})
    assert options_of(parse("--sampler", "euler_a", "--eta", "0.5")) == ("euler_a", {"eta": 0.5})
    assert options_of(parse("--sampler", "unipc", "--spacing", "trailing", "--eta", "0")) == \
        ("unipc", {"spacing": "trailing", "eta": 0.0})


def test_steps_past_the_schedule_refused():
    """Leading spacing with steps_offset 1 takes t = k (T // S) + 1: 1000 steps would reach t = 1000."""
    from ldm.errors import UsageError
    from ldm.samplers import check_steps
    check_steps(parse("--sampler", "euler", "--steps", "999"), 1000)
    check_steps(parse("--sampler", "euler", "--steps", "1000", "--spacing", "trailing"), 1000)
    with pytest.raises(UsageError, match="--steps 1000: leading spacing .* reaches timestep 1000"):
        check_steps(parse("--sampler", "euler", "--steps", "1000"), 1000)


def test_table_spec_sampler_name():
    """A table's ``sampler: {name: ...}`` reaches the jobs' flags; DDIM (named or not) keeps DDIM's flags and its
    jobs' fingerprints."""
    from ldm.evaluation.tables import spec as tables
    base = {"steps": 3, "eta": 1.0, "scale": 3.0}
    assert tables._sampler(base, "s") == tables._sampler({**base, "name": "ddim"}, "s")
    assert tables.sampler_flags(tables._sampler(base, "s")) == ["--ddim_eta", "1.0"]
    s = tables._sampler({**base, "name": "euler_a"}, "s")
    assert tables.sampler_flags(s) == ["--sampler", "euler_a", "--eta", "1.0"]
    assert "euler_a" in tables.Spec.describe_sampler(type("S", (), {"sampler": s})())
    with pytest.raises(tables.SpecError, match="not a sampler"):
        tables._sampler({**base, "name": "plms"}, "s")
    with pytest.raises(tables.SpecError, match="draws no noise"):
        tables._sampler({**base, "name": "heun"}, "s")


@pytest.mark.parametrize("name", ["euler_a", "heun"])
def test_txt2img_with_a_sampler(tmp_path, name):
    """The demo model through scripts/txt2img.py with --sampler: the PNG metadata names the sampler and its
    spacing; --fixed_code starts from the sampler's start latent."""
    import json
    from PIL import Image
    from conftest import REPO_ROOT, load_script
    argv = ["--config", REPO_ROOT / "configs/demo/shapes32.yaml", "--ckpt", REPO_ROOT / "checkpoints/demo/shapes32.ckpt",
            "--prompt", "a red circle", "--H", "32", "--W", "32", "--steps", "4", "--scale", "3", "--sampler", name,
            "--fixed_code", "--outdir", tmp_path, "--skip_grid"]
    assert load_script("txt2img").main([str(a) for a in argv]) == 0
    meta = json.loads(Image.open(tmp_path / "samples" / "00000.png").text["parameters"])
    assert meta["sampler"] == sampler_class(name).label and meta["spacing"] == "leading" and meta["steps"] == 4
    assert ("eta" in meta) == (name == "euler_a")


def test_demo_script_with_a_sampler(tmp_path, monkeypatch, capsys):
    """scripts/demo.py --sampler: the samples record the sampler, they differ from DDIM's from the same noise, and
    the sampler flags that do not fit are refused before the model loads."""
    import json
    import numpy as np
    from PIL import Image
    from conftest import load_script
    demo = load_script("demo")
    common = ["--n", "1", "--only", "32_direct", "--steps", "3", "--threads", "1", "--device", "cpu"]
    imgs = {}
    for name in ("ddim", "dpmpp_2m_karras"):
        assert demo.main(common + ["--sampler", name, "--outdir", str(tmp_path / name)]) == 0
        png = next((tmp_path / name / "32_direct").glob("*.png"))
        meta = json.loads(Image.open(png).text["parameters"])
        assert meta["sampler"] == ("DDIM" if name == "ddim" else sampler_class(name).label) and meta["steps"] == 3
        assert (meta["eta"] is None) == (name != "ddim")  # DPM++ 2M draws no noise: no eta recorded
        imgs[name] = np.asarray(Image.open(png), dtype=np.int16)
    assert np.abs(imgs["ddim"] - imgs["dpmpp_2m_karras"]).max() > 0
    monkeypatch.setattr(demo, "load_demo_model", lambda *a, **k: pytest.fail("model loaded"))
    for bad, needle in ((["--sampler", "heun", "--eta", "0.5"], "draws no noise"),
                        (["--sampler", "euler", "--ddim_eta", "0.5"], "--ddim_eta 0.5 is DDIM's")):
        assert demo.main(common + bad + ["--outdir", str(tmp_path / "bad")]) == 2
        assert needle in capsys.readouterr().err
