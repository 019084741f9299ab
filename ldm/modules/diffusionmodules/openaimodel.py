"""The LDM UNet (``UNetModel``), covering SD 1.x, SD 2.x and SDXL through its kwargs.

Module names and parameter shapes follow the original checkpoints exactly
(``input_blocks.N.M...``, ``middle_block``, ``output_blocks``, ``time_embed``, ``label_emb``, ``out``).
Nothing here knows about ScaleCrafter: re-dilation acts on the 3x3 ``nn.Conv2d`` modules from outside
(see ``ldm/methods/scalecrafter``).
"""
from abc import abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.util import (avg_pool_nd, checkpoint, conv_nd, linear, normalization,
                                               timestep_embedding, zero_module)


class TimestepBlock(nn.Module):
    @abstractmethod
    def forward(self, x, emb):
        """Apply the module to `x` given the timestep embedding `emb`."""


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    """A Sequential that hands each child what it needs: emb to ResBlocks, context to transformers,
    and the skip connection's size to an Upsample (so latents of any size multiple of 1 work)."""

    def forward(self, x, emb, context=None, output_size=None):
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, output_size=output_size)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by an optional 3x3 conv."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, self.channels, self.out_channels, 3, padding=padding)

    def forward(self, x, output_size=None):
        assert x.shape[1] == self.channels
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        elif output_size is not None and tuple(output_size) != (x.shape[-2] * 2, x.shape[-1] * 2):
            # odd-sized skip connections (latent side not a multiple of 8): match the skip exactly
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        if self.use_conv:
            x = self.conv(x)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 conv (or average pooling when ``use_conv`` is False)."""

    def __init__(self, channels, use_conv, dims=2, out_channels=None, padding=1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.dims = dims
        stride = 2 if dims != 3 else (1, 2, 2)
        if use_conv:
            self.op = conv_nd(dims, self.channels, self.out_channels, 3, stride=stride, padding=padding)
        else:
            assert self.channels == self.out_channels
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x):
        assert x.shape[1] == self.channels
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block with a timestep-conditioned shift (or scale-shift) between its two 3x3 convs."""

    def __init__(self, channels, emb_channels, dropout, out_channels=None, use_conv=False,
                 use_scale_shift_norm=False, dims=2, use_checkpoint=False, up=False, down=False):
        super().__init__()
        self.channels = channels
        self.emb_channels = emb_channels
        self.dropout = dropout
        self.out_channels = out_channels or channels
        self.use_conv = use_conv
        self.use_checkpoint = use_checkpoint
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd = Upsample(channels, False, dims)
            self.x_upd = Upsample(channels, False, dims)
        elif down:
            self.h_upd = Downsample(channels, False, dims)
            self.x_upd = Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x, emb):
        return checkpoint(self._forward, (x, emb), self.parameters(), self.use_checkpoint)

    def _forward(self, x, emb):
        if self.updown:
            in_rest, in_conv = self.in_layers[:-1], self.in_layers[-1]
            h = in_conv(self.h_upd(in_rest(x)))
            x = self.x_upd(x)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        while emb_out.dim() < h.dim():
            emb_out = emb_out[..., None]
        if self.use_scale_shift_norm:
            out_norm, out_rest = self.out_layers[0], self.out_layers[1:]
            scale, shift = emb_out.chunk(2, dim=1)
            h = out_rest(out_norm(h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class UNetModel(nn.Module):
    """The diffusion UNet of Stable Diffusion (and its relatives), configured from the original YAML kwargs.

    :param transformer_depth: an int, or one int per level (SDXL: [1, 2, 10]).
    :param num_classes: None, an int (class labels), "continuous", or "sequential" (SDXL's vector
        conditioning ``y`` of width ``adm_in_channels`` through Linear-SiLU-Linear).
    :param use_fp16: accepted for config compatibility; the compute dtype follows the weights'
        dtype (the original cast inputs to fp16, which only works on GPU under autocast).
    """

    def __init__(self, image_size=None, in_channels=4, model_channels=320, out_channels=4, num_res_blocks=2,
                 attention_resolutions=(4, 2, 1), dropout=0, channel_mult=(1, 2, 4, 8), conv_resample=True, dims=2,
                 num_classes=None, use_checkpoint=False, use_fp16=False, use_bf16=False, num_heads=-1,
                 num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=False,
                 resblock_updown=False, use_new_attention_order=False, use_spatial_transformer=False,
                 transformer_depth=1, context_dim=None, n_embed=None, legacy=True,
                 disable_self_attentions=None, num_attention_blocks=None, disable_middle_self_attn=False,
                 use_linear_in_transformer=False, adm_in_channels=None, transformer_depth_middle=None,
                 spatial_transformer_attn_type="softmax", **ignored):
        super().__init__()
        # sgm (SDXL) configs omit use_spatial_transformer: a context_dim implies it there
        if context_dim is None:
            raise NotImplementedError("only the text-conditional UNet (SpatialTransformer with context_dim) is "
                                      "implemented; set context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set num_heads or num_head_channels")
        if n_embed is not None:
            raise NotImplementedError("n_embed (codebook prediction) is not supported")
        if hasattr(context_dim, "__iter__") and not isinstance(context_dim, (list, tuple)):
            context_dim = list(context_dim)  # OmegaConf ListConfig
        if isinstance(transformer_depth, int):
            transformer_depth = len(channel_mult) * [transformer_depth]
        transformer_depth = list(transformer_depth)
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        if isinstance(num_res_blocks, int):
            num_res_blocks = len(channel_mult) * [num_res_blocks]
        num_res_blocks = list(num_res_blocks)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.num_res_blocks = num_res_blocks
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.use_checkpoint = use_checkpoint

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim))

        if num_classes is not None:
            if isinstance(num_classes, int):
                self.label_emb = nn.Embedding(num_classes, time_embed_dim)
            elif num_classes == "continuous":
                self.label_emb = nn.Linear(1, time_embed_dim)
            elif num_classes == "sequential":
                if adm_in_channels is None:
                    raise ValueError('num_classes: "sequential" needs adm_in_channels')
                self.label_emb = nn.Sequential(nn.Sequential(
                    linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)))
            else:
                raise ValueError(f"unknown num_classes {num_classes!r}")

        def heads_for(ch):
            if num_head_channels == -1:
                n_heads, d_head = num_heads, ch // num_heads
            else:
                n_heads, d_head = ch // num_head_channels, num_head_channels
            if legacy:
                d_head = ch // n_heads
            return n_heads, d_head

        def transformer(ch, depth, disable_self_attn=False):
            n_heads, d_head = heads_for(ch)
            return SpatialTransformer(ch, n_heads, d_head, depth=depth, context_dim=context_dim,
                                      disable_self_attn=disable_self_attn, use_linear=use_linear_in_transformer,
                                      use_checkpoint=use_checkpoint)

        def resblock(ch, out_ch, **kw):
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                            use_checkpoint=use_checkpoint, use_scale_shift_norm=use_scale_shift_norm, **kw)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        input_block_chans = [model_channels]
        ch = model_channels
        ds = 1
        for level, mult in enumerate(channel_mult):
            for nr in range(num_res_blocks[level]):
                layers = [resblock(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    disabled_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
                    if num_attention_blocks is None or nr < num_attention_blocks[level]:
                        layers.append(transformer(ch, transformer_depth[level], disabled_sa))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_chans.append(ch)
            if level != len(channel_mult) - 1:
                out_ch = ch
                down = resblock(ch, out_ch, down=True) if resblock_updown else \
                    Downsample(ch, conv_resample, dims=dims, out_channels=out_ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                ch = out_ch
                input_block_chans.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            resblock(ch, ch),
            transformer(ch, transformer_depth_middle, disable_middle_self_attn),
            resblock(ch, ch),
        )

        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(num_res_blocks[level] + 1):
                ich = input_block_chans.pop()
                layers = [resblock(ch + ich, model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    disabled_sa = disable_self_attentions[level] if disable_self_attentions is not None else False
                    if num_attention_blocks is None or i < num_attention_blocks[level]:
                        layers.append(transformer(ch, transformer_depth[level], disabled_sa))
                if level and i == num_res_blocks[level]:
                    out_ch = ch
                    layers.append(resblock(ch, out_ch, up=True) if resblock_updown else
                                  Upsample(ch, conv_resample, dims=dims, out_channels=out_ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )

    @property
    def dtype(self):
        return self.time_embed[0].weight.dtype

    def forward(self, x, timesteps=None, context=None, y=None, **kwargs):
        """x: (N, C, H, W) latents; timesteps: (N,); context: (N, L, D) text; y: (N, adm) for SDXL."""
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("pass y exactly when the model is class/vector-conditional (num_classes set)")
        t_emb = timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(self.dtype)
        emb = self.time_embed(t_emb)
        if self.num_classes is not None:
            assert y.shape[0] == x.shape[0]
            emb = emb + self.label_emb(y.to(self.dtype) if y.is_floating_point() else y)

        hs = []
        h = x.type(self.dtype)
        context = context.type(self.dtype) if isinstance(context, torch.Tensor) else context
        for module in self.input_blocks:
            h = module(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = torch.cat([h, hs.pop()], dim=1)
            # an Upsample ending this block must reproduce the size of the next skip connection
            h = module(h, emb, context, output_size=hs[-1].shape[-2:] if hs else None)
        h = h.type(x.dtype)
        return self.out(h)
