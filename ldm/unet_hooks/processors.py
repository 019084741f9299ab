"""Per-call processors: swap what one module does for the duration of one UNet call.

A *processor* is a callable ``proc(module, *args, **kwargs)`` that computes the module's output in its
place (a re-dilated convolution, windowed self-attention, ...). :func:`installed` shadows ``forward`` on
the module instance for the duration of a ``with`` block and deletes the shadow afterwards, so the
module, its weights and its state dict are never touched and, with nothing installed, the model is the
original bit for bit. Methods build lists of (module, processor) pairs per sampling step (a *plan*) and
install them around their UNet calls; convolutions, attention layers and whole UNet blocks (a
``TimestepEmbedSequential`` of ``input_blocks``/``output_blocks``, a ``SpatialTransformer``) use the same
mechanism. A processor that only adds work before or after the module's own computation calls
:func:`call_original`.
"""
from contextlib import contextmanager


@contextmanager
def installed(modules_and_processors):
    """Give each module its processor for the duration of the block, then restore the original forward.

    ``modules_and_processors``: iterable of (nn.Module, processor). The processor receives the module and
    the arguments of the call (``proc(module, x)`` for a convolution, ``proc(module, x, context=None,
    mask=None)`` for ``CrossAttention``, ``proc(block, x, emb, context=None, output_size=None)`` for a UNet
    block, ``proc(transformer, x, context=None)`` for a ``SpatialTransformer``). Any ``nn.Module`` can hold a
    processor, a parent and its children each their own (the parent's processor reaching the children's
    through :func:`call_original`); a module can hold one processor at a time.
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


def call_original(module, *args, **kwargs):
    """The module's own ``forward`` on these arguments, whether or not a processor is installed on it (its
    children still run theirs): what a processor that wraps its module calls."""
    return type(module).forward(module, *args, **kwargs)


def self_attention_layers(unet):
    """The self-attention modules of a UNet (``attn1`` of transformer blocks that have self-attention), where
    attention processors (FreeScale's scale fusion, attention scaling) are installed."""
    from ldm.modules.attention import BasicTransformerBlock
    return [m.attn1 for m in unet.modules() if isinstance(m, BasicTransformerBlock) and not m.disable_self_attn]
