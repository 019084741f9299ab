"""FreeScale (Qiu et al., 2024): tailored self-cascade, restrained dilation and scale fusion.

* ``scale_fusion.py``: the attention processor (local windows + global attention, Gaussian split);
* ``cascade.py``: the stages (decode, resize, encode, re-noise, skip residual) and the restrained dilation;
* ``presets.py``: the YAML presets in ``configs/freescale/``.
"""
from ldm.freescale.cascade import FreeScale, FreeScaleSettings, default_stages  # noqa: F401
