"""The CompVis import path of the DDIM sampler (``from ldm.models.diffusion.ddim import DDIMSampler``); the sampler
lives in ``ldm/samplers/ddim.py``, the guidance helpers in ``ldm/guidance.py``."""
from ldm.guidance import cat_cond as _cat_cond, classifier_free_guidance  # noqa: F401
from ldm.samplers.ddim import DDIMSampler  # noqa: F401
