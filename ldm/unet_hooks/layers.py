"""Which convolutions of a ``UNetModel`` can be re-dilated, and what they are called.

Two naming schemes are accepted everywhere a layer is named:
* this UNet's own module paths (``input_blocks.4.0.in_layers.2``, ``input_blocks.3.0.op``,
  ``output_blocks.2.2.conv``, ``middle_block.2.out_layers.3``);
* the diffusers names of the authors' released settings files (``down_blocks.1.resnets.0.conv1``,
  ``down_blocks.0.downsamplers.0.conv``, ``mid_block.resnets.1.conv2``, ``up_blocks.0.upsamplers.0.conv``).

The mapping is derived from the UNet's structure (levels, residual blocks per level), so it holds for
SD 1.x/2.x (4 levels) and SDXL (3 levels) alike.
"""
import difflib
import math
import warnings
from pathlib import Path

import torch.nn as nn

from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample


def _is(layer, cls):
    """isinstance, or an instance of a class of the same name: ComfyUI's copy of the CompVis UNet has the same
    block classes and module paths (comfyui/, docs/comfyui.md), so the names resolve on it too."""
    return isinstance(layer, cls) or type(layer).__name__ == cls.__name__


def _resblock_convs(prefix, block):
    return {f"{prefix}.in_layers.2": block.in_layers[2], f"{prefix}.out_layers.3": block.out_layers[3]}


def conv_table(unet):
    """Ordered list of (own_name, diffusers_name, conv) for every re-dilatable 3x3 convolution.

    Re-dilatable: the two 3x3 convs of each ResBlock, the stride-2 downsampling convs and the
    upsampling convs; not conv_in / the output conv (the diffusers files never name them, and the
    original command-line form reaches conv_in only with --dilate_skip 0, see ``flag_layers``).
    """
    rows = []
    levels = len(unet.channel_mult)
    n_res = unet.num_res_blocks
    # input side: input_blocks[0] is conv_in; then per level n_res ResBlocks and (but the last) a Downsample
    idx = 1
    for level in range(levels):
        for j in range(n_res[level]):
            block = unet.input_blocks[idx][0]
            assert _is(block, ResBlock)
            for own, conv in _resblock_convs(f"input_blocks.{idx}.0", block).items():
                which = "conv1" if own.endswith("in_layers.2") else "conv2"
                rows.append((own, f"down_blocks.{level}.resnets.{j}.{which}", conv))
            idx += 1
        if level != levels - 1:
            down = unet.input_blocks[idx][0]
            if _is(down, Downsample) and down.use_conv:
                rows.append((f"input_blocks.{idx}.0.op", f"down_blocks.{level}.downsamplers.0.conv", down.op))
            idx += 1
    for k, j in ((0, 0), (2, 1)):
        block = unet.middle_block[k]
        for own, conv in _resblock_convs(f"middle_block.{k}", block).items():
            which = "conv1" if own.endswith("in_layers.2") else "conv2"
            rows.append((own, f"mid_block.resnets.{j}.{which}", conv))
    # output side: diffusers' up_blocks.0 is the deepest level
    idx = 0
    for up_level, level in enumerate(reversed(range(levels))):
        for j in range(n_res[level] + 1):
            seq = unet.output_blocks[idx]
            for own, conv in _resblock_convs(f"output_blocks.{idx}.0", seq[0]).items():
                which = "conv1" if own.endswith("in_layers.2") else "conv2"
                rows.append((own, f"up_blocks.{up_level}.resnets.{j}.{which}", conv))
            for pos, layer in enumerate(seq):
                if _is(layer, Upsample) and layer.use_conv:
                    rows.append((f"output_blocks.{idx}.{pos}.conv", f"up_blocks.{up_level}.upsamplers.0.conv",
                                 layer.conv))
            idx += 1
    return rows


def flag_layers(unet, skip):
    """Own names of the 3x3 convs the original command-line form dilates: every 3x3 Conv2d in
    input_blocks after the first ``skip`` blocks, in the middle block, and in output_blocks except the
    last ``skip`` (the authors' CompVis version, ``--dilate_skip``)."""
    names = []
    n_out = len(unet.output_blocks)
    groups = [("input_blocks", unet.input_blocks, range(skip, len(unet.input_blocks))),
              ("middle_block", [unet.middle_block], [0]),
              ("output_blocks", unet.output_blocks, range(0, n_out - skip))]
    for gname, blocks, indices in groups:
        for i in indices:
            block = blocks[i]
            prefix = gname if gname == "middle_block" else f"{gname}.{i}"
            for name, m in block.named_modules():
                if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3):
                    names.append(f"{prefix}.{name}")
    return names


class LayerNames:
    """Resolves own or diffusers names to this UNet's conv modules."""

    def __init__(self, unet):
        self.unet = unet
        self.rows = conv_table(unet)
        self.own = {own: conv for own, _, conv in self.rows}
        self.diffusers_to_own = {diff: own for own, diff, _ in self.rows}
        modules = dict(unet.named_modules())
        # the flag form may also reach conv_in (skip 0): accept any 3x3 conv by its own path
        self.all_3x3 = {n: m for n, m in modules.items() if isinstance(m, nn.Conv2d) and m.kernel_size == (3, 3)}

    def resolve(self, name):
        """Own module path for ``name`` (own or diffusers naming), or None."""
        if name in self.all_3x3:
            return name
        return self.diffusers_to_own.get(name)

    def module(self, own_name):
        return self.all_3x3[own_name]

    def suggestions(self, name, n=3):
        pool = list(self.diffusers_to_own) if "_blocks" in name and "." in name and name.split(".")[0] in (
            "down_blocks", "up_blocks", "mid_block") else list(self.all_3x3)
        if name.startswith("mid_block"):
            pool = list(self.diffusers_to_own)
        return difflib.get_close_matches(name, pool, n=n, cutoff=0.5)


# ------------------------------------------------------------------------------------------------
# settings files: `module_name:factor` lines naming layers (the authors' format)

class SettingsError(ValueError):
    pass


def _sd_layout_names():
    """Every re-dilatable conv of the SD 1.x/2.x UNet in diffusers naming (4 levels, 2 ResBlocks per level on
    the way down, 3 on the way up): the vocabulary of the released settings files (all_valid_convs.txt)."""
    names = []
    for level in range(4):
        names += [f"down_blocks.{level}.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]
        if level < 3:
            names.append(f"down_blocks.{level}.downsamplers.0.conv")
    names += [f"mid_block.resnets.{j}.conv{c}" for j in range(2) for c in (1, 2)]
    for level in range(4):
        names += [f"up_blocks.{level}.resnets.{j}.conv{c}" for j in range(3) for c in (1, 2)]
        if level < 3:
            names.append(f"up_blocks.{level}.upsamplers.0.conv")
    return frozenset(names)


SD_LAYOUT_NAMES = _sd_layout_names()


def _is_sd_name(name):
    """A name the released files could legitimately use (valid for SD 1.x/2.x) — not a typo."""
    return name in SD_LAYOUT_NAMES


def parse_settings_file(path, with_factor=True):
    """The lines of a settings file as [(line number, name, factor)] (factor None when ``with_factor`` is False),
    checked without a model: the file exists, every line is ``name:factor`` with a finite factor >= 1 (a NaN factor
    would pass ``>= 1`` tests as False and re-dilate by NaN mid-sampling). Names are resolved against a UNet by
    :func:`read_settings_file`."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"settings file {path}: "
                            f"{'is a folder, not a file' if path.is_dir() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"settings file {path} cannot be read as UTF-8 text ({err})") from None
    rows = []
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if with_factor:
            if line.count(":") != 1:
                raise SettingsError(f"{path}:{lineno}: expected 'module_name:factor', got {raw.strip()!r}")
            name, value = (s.strip() for s in line.split(":"))
            try:
                factor = float(value)
            except ValueError:
                raise SettingsError(f"{path}:{lineno}: factor {value!r} is not a number") from None
            if not math.isfinite(factor) or factor < 1:
                raise SettingsError(f"{path}:{lineno}: factor {value} must be a finite number >= 1 (1: the layer "
                                    "as trained)")
        else:
            name, factor = line.split(":")[0].strip(), None
        rows.append((lineno, name, factor))
    return rows


def read_settings_file(path, names, with_factor=True, dead_names="error"):
    """Parse a settings file into {own_name: factor} (or a set of own names when ``with_factor`` is False)."""
    path = Path(path)
    out = {}
    dead = []
    for lineno, name, factor in parse_settings_file(path, with_factor):
        own = names.resolve(name)
        if own is None:
            if dead_names == "warn" and _is_sd_name(name):
                dead.append(name)
                continue
            hint = names.suggestions(name)
            hint = f"; closest valid names: {', '.join(hint)}" if hint else ""
            raise SettingsError(f"{path}:{lineno}: no convolution named {name!r} in this UNet{hint}")
        out[own] = factor
    if dead:
        warnings.warn(f"{path}: {len(dead)} layer name(s) match no module of this UNet and are skipped, as the "
                      f"authors' code skips them silently: {', '.join(dead)}", stacklevel=2)
    return out if with_factor else set(out)
