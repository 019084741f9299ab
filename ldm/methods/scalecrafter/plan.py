"""The per-step plan: which convolution runs with which dilation (or dispersion) at sampling step i.

A plan is data: base factors per layer, how long they apply (tau), and how they decay. The sampler asks
``plan.processors(step, branch)`` once per UNet call; the answer is a list of (conv, processor) pairs to
install (see ``redilation.installed``). An empty plan is plain sampling.
"""
from dataclasses import dataclass, field
from typing import Optional

from ldm.unet_hooks.redilation import Dispersion, ReDilation
from ldm.unet_hooks.schedule import LayerSchedule


@dataclass
class ScaleCrafterPlan:
    """Everything the sampler needs, resolved against one UNet.

    dilate: the strong schedule (ε̃ in the paper). ndcfg: the mild schedule of the noise-damped base
    prediction (ε_base), used for steps < ndcfg.tau. disperse_layers: layers whose kernels are dispersed
    (3×3 → 5×5 by the transform R) while they are dilated and step < disperse_tau.
    """
    names: object  # LayerNames
    dilate: LayerSchedule
    ndcfg: Optional[LayerSchedule] = None
    disperse_layers: frozenset = frozenset()
    disperse_tau: int = 0
    disperse_transform: object = None  # torch tensor (large², small²)
    # keep dispersed kernels for the run instead of recomputing them per call (direct path only; 25/9× the
    # layers' weights)
    cache_dispersed_kernels: bool = False
    # "auto" (per layer, measured rule in redilation.choose_dispersion_path), "direct" or "basis"
    dispersion_path: str = "auto"
    _dispersed_weights: dict = field(default_factory=dict, repr=False)

    def uses_ndcfg(self, step):
        return self.ndcfg is not None and step < self.ndcfg.tau

    def describe(self, step, branch="strong"):
        """{layer: 'dilate 2' | 'dilate 2.5' | 'disperse 4'} for this step: what the UNet call will run."""
        return {name: repr(proc) for name, proc in self._processor_map(step, branch).items()}

    def _processor_map(self, step, branch):
        if branch == "ndcfg":
            if not self.uses_ndcfg(step):
                return {}
            return {name: ReDilation(f) for name, f in self.ndcfg.at(step).items()}
        procs = {}
        for name, f in self.dilate.at(step).items():
            if name in self.disperse_layers and step < self.disperse_tau:
                cache = self._dispersed_weights if self.cache_dispersed_kernels else None
                procs[name] = Dispersion(f, self.disperse_transform, cache, self.dispersion_path)
            else:
                procs[name] = ReDilation(f)
        return procs

    def processors(self, step, branch="strong"):
        return [(self.names.module(name), proc) for name, proc in self._processor_map(step, branch).items()]

    def release(self):
        """Drop cached dispersed kernels (they belong to one run)."""
        self._dispersed_weights.clear()
