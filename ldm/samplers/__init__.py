"""Samplers on one contract (``ldm/samplers/base.py``), registered here by name: one module and one line each.
``add_args`` / ``options_of`` give the pipelines' ``--sampler``, ``--spacing`` and ``--eta`` options."""
import importlib

from ldm.errors import UsageError

SAMPLERS = {
    "ddim": "ldm.samplers.ddim:DDIMSampler",
    "euler": "ldm.samplers.euler:EulerSampler",
    "euler_a": "ldm.samplers.euler_ancestral:EulerAncestralSampler",
    "heun": "ldm.samplers.heun:HeunSampler",
    "dpmpp_2m": "ldm.samplers.dpmpp_2m:DPMPP2MSampler",
    "dpmpp_2m_karras": "ldm.samplers.dpmpp_2m:DPMPP2MKarrasSampler",
    "dpmpp_2m_sde": "ldm.samplers.dpmpp_2m_sde:DPMPP2MSDESampler",
    "unipc": "ldm.samplers.unipc:UniPCSampler",
}
SPACING_CHOICES = ("leading", "trailing", "linspace", "karras")  # ldm/samplers/kdiff.py: SPACINGS


def sampler_class(name):
    if name not in SAMPLERS:
        raise KeyError(f"unknown sampler {name!r}; known: {', '.join(SAMPLERS)}")
    module, cls = SAMPLERS[name].split(":")
    return getattr(importlib.import_module(module), cls)


def takes_eta(name):
    """Whether the sampler ``name`` draws noise scaled by an eta: DDIM (its eta) and the stochastic samplers
    (euler_a, dpmpp_2m_sde: the ancestral/SDE noise)."""
    return name == "ddim" or sampler_class(name).stochastic


def make_sampler(name, model, **options):
    return sampler_class(name)(model, **options)


def add_args(parser):
    """--sampler, --spacing, --eta (DDIM keeps its --ddim_eta, defined by the pipeline)."""
    g = parser.add_argument_group("sampler")
    g.add_argument("--sampler", choices=list(SAMPLERS), default=None,
                   help="the sampler (default: the method preset's `sampler:`, else ddim): ddim, euler, euler_a (ancestral), heun (2nd order, two model calls "
                        "per step), dpmpp_2m (DPM-Solver++(2M)), dpmpp_2m_karras (on Karras sigmas), dpmpp_2m_sde, "
                        "unipc (docs: ldm/samplers/)")
    g.add_argument("--spacing", choices=SPACING_CHOICES, default=None,
                   help="timestep spacing of the samplers other than ddim (default: leading with steps_offset 1, as "
                        "diffusers configures SD and SDXL; karras for dpmpp_2m_karras). DDIM's own is leading")
    from ldm.util import finite_float
    g.add_argument("--eta", type=finite_float, default=None,
                   help="noise scale of euler_a and dpmpp_2m_sde (default 1: the full ancestral/SDE noise; 0: none). "
                        "DDIM's is --ddim_eta")


def options_of(opt, preferred=None):
    """(name, keyword options) of the sampler the flags ask for (``preferred``, e.g. a method preset's ``sampler:``,
    when --sampler is not given; else ddim); UsageError for flags that do not fit it."""
    name = getattr(opt, "sampler", None) or preferred or "ddim"
    spacing, eta = getattr(opt, "spacing", None), getattr(opt, "eta", None)
    ddim_eta = float(getattr(opt, "ddim_eta", 0.0) or 0.0)
    if name == "ddim":
        if spacing is not None:
            raise UsageError(f"--spacing {spacing}: DDIM takes its own uniform timesteps (diffusers' leading with "
                             "steps_offset 1); --spacing is for --sampler " + ", ".join(n for n in SAMPLERS if n != "ddim"))
        if eta is not None:
            raise UsageError(f"--eta {eta:g} is the noise of --sampler euler_a / dpmpp_2m_sde; DDIM's is --ddim_eta")
        return name, {"eta": ddim_eta}
    if ddim_eta:
        raise UsageError(f"--ddim_eta {ddim_eta:g} is DDIM's; --sampler {name} does not use it"
                         + (" (its noise is --eta)" if sampler_class(name).stochastic else ""))
    options = {} if spacing is None else {"spacing": spacing}
    if eta is not None:
        if eta < 0:
            raise UsageError(f"--eta {eta:g}: must be >= 0 (0: no noise, 1: the full ancestral/SDE noise)")
        if not sampler_class(name).stochastic and eta != 0:
            raise UsageError(f"--eta {eta:g}: --sampler {name} draws no noise; --eta is for euler_a and dpmpp_2m_sde")
        options["eta"] = eta
    return name, options


def from_options(opt, model, preferred=None):
    """The sampler of the pipeline flags (``options_of``) on ``model``."""
    name, options = options_of(opt, preferred)
    return make_sampler(name, model, **options)


def check_steps(opt, num_timesteps, preferred=None):
    """UsageError when the spacing of --sampler/--spacing cannot take --steps steps from the model's timesteps."""
    name, options = options_of(opt, preferred)
    if name == "ddim":
        return
    from ldm.samplers.kdiff import spaced_timesteps
    cls = sampler_class(name)
    spacing = options.get("spacing", cls.default_spacing)
    if spacing == "karras":
        return
    ts = spaced_timesteps(spacing, opt.steps, num_timesteps, 1, cls.multistep_grid)
    if ts.max() > num_timesteps - 1:
        raise UsageError(f"--steps {opt.steps}: {spacing} spacing (steps_offset 1) then reaches timestep "
                         f"{int(ts.max())}, past the model's last ({num_timesteps - 1}); take fewer steps or "
                         "--spacing trailing")
