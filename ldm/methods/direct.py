"""Direct sampling: the model at the requested size with plain classifier-free guidance (the papers' baseline)."""
from ldm.methods.base import GuidanceMethod


class Direct(GuidanceMethod):
    name = "direct"
    label = "direct sampling"
    summary = "direct sampling at the requested size"
