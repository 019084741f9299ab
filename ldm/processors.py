"""Per-call processors: swap what one module does for the duration of one UNet call.

A *processor* is a callable ``proc(module, *args, **kwargs)`` that computes the module's output in its
place (a re-dilated convolution, windowed self-attention, ...). :func:`installed` shadows ``forward`` on
the module instance for the duration of a ``with`` block and deletes the shadow afterwards, so the
module, its weights and its state dict are never touched and, with nothing installed, the model is the
original bit for bit. Methods build lists of (module, processor) pairs per sampling step (a *plan*) and
install them around their UNet calls; convolutions and attention layers use the same mechanism.
"""
from contextlib import contextmanager


@contextmanager
def installed(modules_and_processors):
    """Give each module its processor for the duration of the block, then restore the original forward.

    ``modules_and_processors``: iterable of (nn.Module, processor). The processor receives the module and
    the arguments of the call (``proc(module, x)`` for a convolution, ``proc(module, x, context=None,
    mask=None)`` for ``CrossAttention``). A module can hold one processor at a time.
    """
    touched = []
    try:
        for module, proc in modules_and_processors:
            if "forward" in module.__dict__:
                raise RuntimeError(f"a processor is already installed on this {type(module).__name__}")
            module.forward = (lambda m, p: (lambda *args, **kwargs: p(m, *args, **kwargs)))(module, proc)
            touched.append(module)
        yield
    finally:
        for module in touched:
            del module.forward


def self_attention_layers(unet):
    """The self-attention modules of a UNet (``attn1`` of transformer blocks that have self-attention), where
    attention processors (FreeScale's scale fusion, attention scaling) are installed."""
    from ldm.modules.attention import BasicTransformerBlock
    return [m.attn1 for m in unet.modules() if isinstance(m, BasicTransformerBlock) and not m.disable_self_attn]
