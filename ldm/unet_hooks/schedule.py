"""A per-layer factor schedule over sampling steps (re-dilation factors), shared by the methods that re-dilate."""
import math
from dataclasses import dataclass
from typing import Dict


@dataclass
class LayerSchedule:
    """Base factor per layer (own names), active for sampling steps i < tau.

    progressive:
      * ``False``: the base factor for every step i < tau;
      * ``"linear"`` (the authors' diffusers release): max(⌈d·(tau − i)/tau⌉, 2);
      * ``"stages"`` (the authors' CompVis release, ``--progressive_dilate``): integer stages from ⌈d⌉ down
        to 2, each held for ⌈tau / number of stages⌉ steps.
    """
    factors: Dict[str, float]
    tau: int
    progressive: object = False

    def factor_at(self, base, step):
        if step >= self.tau:
            return None
        if not self.progressive:
            return base
        if self.progressive == "stages":
            stages = list(range(2, math.ceil(base) + 1))[::-1]
            if not stages:
                return base
            per_stage = math.ceil(self.tau / len(stages))
            return float(stages[min(step // per_stage, len(stages) - 1)])
        return float(max(math.ceil(base * (self.tau - step) / self.tau), 2))

    def at(self, step):
        """{layer: factor} for this step, leaving out layers at factor 1 (the original conv)."""
        out = {}
        for name, base in self.factors.items():
            f = self.factor_at(base, step)
            if f is not None and f != 1:
                out[name] = f
        return out
