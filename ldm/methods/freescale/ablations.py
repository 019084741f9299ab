"""Switches for the ablations of FreeScale's Table 2 (Qiu et al., arXiv 2412.09626v1) that need more than the
cascade's existing settings.

Table 2's rows and the preset keys that give them (``configs/tables/freescale_table2.yaml``):

* "w/o Scale Fusion": ``fusion: false`` (self-attention stays global; an existing setting);
* "Latent Space Upsampling": ``resize: latent`` (bicubic on the latent between stages; an existing setting);
* "Dilated Up-Blocks": ``dilate_up_blocks: true`` (this module): the restrained dilation also re-dilates the
  convolutions of every up block. The paper says only that dilating up-block layers "brings many messy
  textures"; the layers used here are the ones the release lists and comments out next to its down/mid list
  (ali-vilab/FreeScale d5a2256, ``pipeline_freescale.py``, ``dilate_layers``): for SDXL every ResBlock conv1/conv2
  of up_blocks.0–2 and the upsampler convs of up_blocks.0–1, i.e. every re-dilatable convolution of the up path.
  For the 4-level SD UNets and the demo model the same rule (every up-path ResBlock conv and upsampler conv).
* "Ours": the full preset.
"""
from ldm.unet_hooks.layers import conv_table


def up_block_layer_names(unet):
    """Diffusers-style names of every re-dilatable up-path convolution (ResBlock conv1/conv2 of each up block,
    and each up block's upsampler conv), in the UNet's order."""
    names = []
    for _, diffusers_name, _ in conv_table(unet):
        if not diffusers_name.startswith("up_blocks."):
            continue
        if (".resnets." in diffusers_name and diffusers_name.endswith((".conv1", ".conv2"))) \
                or diffusers_name.endswith(".upsamplers.0.conv"):
            names.append(diffusers_name)
    return names
