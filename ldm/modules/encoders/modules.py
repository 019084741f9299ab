"""Conditioning encoders named by the original configs (``ldm.modules.encoders.modules.*``).

Both text encoders are built from configuration only (no download, no pretrained weights): the
weights come later from the Stable Diffusion checkpoint, whose key layout they reproduce exactly.
open_clip and transformers are imported inside the constructors because importing them is slow.
"""
import math
import warnings
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ldm.errors import InputWarning


def disabled_train(self, mode=True):
    """Replacement for ``nn.Module.train`` that keeps a frozen module in eval mode."""
    return self


def _freeze(module):
    """eval() and no gradients (the wrapping model may also swap ``train`` for ``disabled_train``)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad = False
    return module


def _module_device(module):
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


class AbstractEncoder(nn.Module):
    def __init__(self):
        super().__init__()

    def encode(self, *args, **kwargs):
        raise NotImplementedError


def warn_truncated(encoder, text, n_dropped, dropped_text, max_length):
    """Warn (:class:`ldm.inference.InputWarning`) that ``text`` lost ``n_dropped`` tokens to the encoder's
    ``max_length``; once per prompt and encoder (``encoder._truncation_warned``, a set that SDXL's
    conditioner shares between its text encoders, so each prompt is reported once per loaded model)."""
    seen = getattr(encoder, "_truncation_warned", None)
    if seen is None:
        seen = encoder._truncation_warned = set()
    if text in seen:
        return
    seen.add(text)
    warnings.warn(f"The following part of your input was truncated because CLIP can only handle sequences up to "
                  f"{max_length} tokens ({n_dropped} token(s) dropped from the prompt {text[:40]!r}"
                  f"{'...' if len(text) > 40 else ''}): {dropped_text.strip()!r}", InputWarning, stacklevel=4)


class IdentityEncoder(AbstractEncoder):
    """Passes the conditioning through unchanged (e.g. for precomputed embeddings)."""

    def encode(self, x):
        return x

    def forward(self, x):
        return x


# --------------------------------------------------------------------------------------------------
# SD 2.x: OpenCLIP text tower
# --------------------------------------------------------------------------------------------------

def _plain_container(cfg):
    """OmegaConf nodes (what a YAML config passes) -> plain dicts/lists."""
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf
        return OmegaConf.to_container(cfg, resolve=True)
    if isinstance(cfg, Mapping):
        return {k: _plain_container(v) for k, v in cfg.items()}
    return cfg


# Any vision config will do: the vision tower is only ever built on the meta device and then deleted.
_TINY_VISION_CFG = {"image_size": 32, "layers": 1, "width": 64, "head_width": 32, "patch_size": 16}


def _openclip_model_config(arch):
    """open_clip model config ({embed_dim, vision_cfg, text_cfg, ...}) for a name or a custom dict.

    A dict may be a full open_clip config (with ``text_cfg``) or just the text settings plus
    ``embed_dim`` (width, layers, heads, context_length, vocab_size, [mlp_ratio, quick_gelu]).
    """
    if isinstance(arch, str):
        import open_clip
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        return dict(cfg)
    cfg = _plain_container(arch)
    if "text_cfg" in cfg:
        cfg = dict(cfg)
        cfg.setdefault("vision_cfg", dict(_TINY_VISION_CFG))
        return cfg
    text_cfg = dict(cfg)
    embed_dim = text_cfg.pop("embed_dim", text_cfg.get("width", 512))
    quick_gelu = text_cfg.pop("quick_gelu", False)
    return {"embed_dim": embed_dim, "vision_cfg": dict(_TINY_VISION_CFG), "text_cfg": text_cfg,
            "quick_gelu": quick_gelu}


def _causal_mask(n, device=None, dtype=torch.float32):
    return torch.full((n, n), float("-inf"), device=device, dtype=dtype).triu_(1)


def _init_openclip_text(model):
    """Fresh random init of the text tower, with open_clip's distributions.

    Needed because the model is built on the meta device and only then given real storage; the
    values matter only for tests and tiny demo models (real use loads a checkpoint).
    """
    for m in model.modules():
        if isinstance(m, nn.MultiheadAttention):
            m._reset_parameters()
        elif hasattr(m, "reset_parameters") and m is not model:
            m.reset_parameters()
    tr = model.transformer
    width, layers = tr.width, tr.layers
    proj_std = width ** -0.5 * (2 * layers) ** -0.5
    nn.init.normal_(model.token_embedding.weight, std=0.02)
    nn.init.normal_(model.positional_embedding, std=0.01)
    for block in tr.resblocks:
        nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
        nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
        nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
        nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
    proj = model.text_projection
    if isinstance(proj, nn.Linear):
        nn.init.normal_(proj.weight, std=width ** -0.5)
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)
    elif proj is not None:
        nn.init.normal_(proj, std=width ** -0.5)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1 / 0.07))
        if getattr(model, "logit_bias", None) is not None:
            model.logit_bias.fill_(-10.0)


def _to_empty(module, device):
    """``module.to_empty(device)`` by replacing tensors rather than swapping them in place (the in-place swap
    is refused for the fake tensors of ``tools.fake_cuda``; for real tensors both are the same)."""
    for m in module.modules():
        for name, p in list(m._parameters.items()):
            if p is not None:
                m._parameters[name] = nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
        for name, b in list(m._buffers.items()):
            if b is not None:
                m._buffers[name] = torch.empty_like(b, device=device)


def build_openclip_text_model(arch):
    """open_clip ``CLIP`` without its vision tower, which is never allocated.

    The whole model is constructed on the meta device, ``visual`` is deleted, and the rest gets real
    storage on the ambient default device (so ``with torch.device("meta"):`` keeps it all on meta).
    """
    from open_clip.model import CLIP

    cfg = _openclip_model_config(arch)
    if cfg.get("custom_text") or (cfg["text_cfg"] or {}).get("hf_model_name"):
        raise NotImplementedError("only open_clip CLIP models with the built-in text transformer are supported")
    target = torch.empty(0).device  # honours an enclosing `with torch.device(...)`
    with torch.device("meta"):
        model = CLIP(embed_dim=cfg["embed_dim"], vision_cfg=cfg["vision_cfg"], text_cfg=cfg["text_cfg"],
                     quick_gelu=cfg.get("quick_gelu", False))
    del model.visual
    if target.type != "meta":
        _to_empty(model, target)
        with torch.no_grad():
            _init_openclip_text(model)
    # causal mask: kept as a non-persistent buffer, as in the original (not in checkpoints)
    n = model.positional_embedding.shape[0]
    model.register_buffer("attn_mask", _causal_mask(n, device=target), persistent=False)
    return model


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """OpenCLIP text encoder of SD 2.x: ``forward(list of B str) -> (B, max_length, width)``.

    ``layer="last"`` runs every residual block, ``"penultimate"`` (SD2) all but the last; both end
    with ``ln_final``. The weights live at ``self.model`` (open_clip ``CLIP`` minus ``visual``), so the
    state dict matches ``cond_stage_model.model.*`` of the SD2 checkpoints. ``version`` names the
    pretrained tag of the original and is not used: nothing is downloaded. ``device`` is accepted for
    config compatibility; nothing is moved here (move the whole model), and tokens follow the weights.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77,
                 freeze=True, layer="last"):
        super().__init__()
        assert layer in self.LAYERS, f"layer must be one of {self.LAYERS}, got {layer!r}"
        self.model = build_openclip_text_model(arch)
        self.arch = arch if isinstance(arch, str) else _plain_container(arch)
        self.version = version
        self.requested_device = device
        self.max_length = max_length
        if max_length > self.model.positional_embedding.shape[0]:
            raise ValueError(f"max_length {max_length} exceeds the model's context length "
                             f"{self.model.positional_embedding.shape[0]}")
        self.layer = layer
        self.layer_idx = {"last": 0, "penultimate": 1}[layer]  # blocks skipped at the end
        if freeze:
            self.freeze()

    @property
    def device(self):
        return _module_device(self)

    def freeze(self):
        _freeze(self.model)
        for p in self.parameters():
            p.requires_grad = False

    def tokenize(self, text):
        import open_clip  # its tokenizer pads with 0 and keeps <end_of_text> on truncation, as SD2 did
        if isinstance(text, str):
            text = [text]
        bpe = getattr(open_clip.tokenizer, "_tokenizer", None)  # the instance open_clip.tokenize uses
        for t in text if bpe is not None else ():
            ids = bpe.encode(t)
            if len(ids) > self.max_length - 2:
                dropped = ids[self.max_length - 2:]
                warn_truncated(self, t, len(dropped), bpe.decode(dropped), self.max_length)
        return open_clip.tokenize(list(text), context_length=self.max_length)

    def forward(self, text):
        tokens = self.tokenize(text).to(self.device)
        return self.encode_with_transformer(tokens)

    def encode_with_transformer(self, tokens):
        """Token ids (B, L) -> per-token features (B, L, width) after ``ln_final``."""
        m = self.model
        L = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:L]
        mask = m.attn_mask[:L, :L].to(device=x.device, dtype=x.dtype)
        x = self.text_transformer_forward(x, attn_mask=mask)
        return m.ln_final(x)

    def text_transformer_forward(self, x, attn_mask=None):
        """Residual blocks on batch-first ``x``, stopping ``layer_idx`` blocks before the end."""
        tr = self.model.transformer
        seq_first = not getattr(tr, "batch_first", False)  # open_clip < 2.14 runs (L, B, D)
        if seq_first:
            x = x.transpose(0, 1)
        blocks = list(tr.resblocks)
        for block in blocks[:len(blocks) - self.layer_idx]:
            if getattr(tr, "grad_checkpointing", False) and torch.is_grad_enabled() and x.requires_grad:
                x = checkpoint(partial(block, attn_mask=attn_mask), x, use_reentrant=False)
            else:
                x = block(x, attn_mask=attn_mask)
        if seq_first:
            x = x.transpose(0, 1)
        return x

    def encode(self, text):
        return self(text)


# --------------------------------------------------------------------------------------------------
# SD 1.x: Hugging Face CLIP ViT-L/14 text model
# --------------------------------------------------------------------------------------------------

# The checkpoints store the text model under "text_model." with a persistent int64 `position_ids`
# [1, 77] (transformers < 4.31). Newer transformers make position_ids non-persistent, and 5.x drops
# the "text_model." level. The two hooks below translate between that layout and the installed one.
_HF_TEXT_PREFIX = "text_model."
_HF_POSITION_IDS = "embeddings.position_ids"


def _hf_layout(hf_model):
    """(prefix of the text transformer inside `hf_model`, its embeddings module, position_ids persistent?)"""
    inner = getattr(hf_model, "text_model", None)
    prefix = _HF_TEXT_PREFIX if isinstance(inner, nn.Module) else ""
    emb = (inner if prefix else hf_model).embeddings
    persistent = "position_ids" in emb._buffers and "position_ids" not in emb._non_persistent_buffers_set
    return prefix, emb, persistent


def _position_ids_like(emb):
    weight = emb.position_embedding.weight
    return torch.arange(weight.shape[0], device=weight.device, dtype=torch.long)[None]


def _hf_load_pre_hook(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs):
    """Accept the historical layout (and the installed one) when loading into ``module``.

    A stored position_ids is never trusted: some merged SD1 files carry corrupted (float) values,
    and it is always arange(77). It is dropped, or regenerated where the installed module keeps it.
    """
    inner_prefix, emb, persistent = _hf_layout(module)
    keys = [k for k in state_dict if k.startswith(prefix)]
    moved = []
    for key in keys:
        value = state_dict.pop(key)
        rest = key[len(prefix):]
        if rest.startswith(_HF_TEXT_PREFIX):
            rest = rest[len(_HF_TEXT_PREFIX):]
        if rest == _HF_POSITION_IDS:
            continue
        moved.append((prefix + inner_prefix + rest, value))
    if persistent:
        state_dict[prefix + inner_prefix + _HF_POSITION_IDS] = _position_ids_like(emb)
    for key, value in moved:
        state_dict[key] = value


def _hf_state_dict_post_hook(module, state_dict, prefix, local_metadata):
    """Emit the historical layout: ``text_model.*`` keys plus int64 ``embeddings.position_ids`` first."""
    inner_prefix, emb, _ = _hf_layout(module)
    keys = [k for k in state_dict if k.startswith(prefix)]
    items = [(k[len(prefix):], state_dict.pop(k)) for k in keys]
    canonical = []
    for rest, value in items:
        if inner_prefix and rest.startswith(inner_prefix):
            rest = rest[len(inner_prefix):]
        if rest != _HF_POSITION_IDS:
            canonical.append((rest, value))
    state_dict[prefix + _HF_TEXT_PREFIX + _HF_POSITION_IDS] = _position_ids_like(emb)
    for rest, value in canonical:
        state_dict[prefix + _HF_TEXT_PREFIX + rest] = value


def _register_layout_hooks(hf_model):
    if hasattr(hf_model, "register_state_dict_post_hook"):
        hf_model.register_state_dict_post_hook(_hf_state_dict_post_hook)
    else:  # torch < 2.4
        hf_model._register_state_dict_hook(_hf_state_dict_post_hook)
    if hasattr(hf_model, "register_load_state_dict_pre_hook"):
        hf_model.register_load_state_dict_pre_hook(_hf_load_pre_hook)
    else:
        hf_model._register_load_state_dict_pre_hook(_hf_load_pre_hook, with_module=True)


# CLIP ViT-L/14 text model (openai/clip-vit-large-patch14), as used by SD 1.x and SDXL's first encoder.
SD1_TEXT_CONFIG = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                       num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                       projection_dim=768)
_KNOWN_HF_CONFIGS = {"openai/clip-vit-large-patch14": SD1_TEXT_CONFIG}


class FrozenCLIPEmbedder(AbstractEncoder):
    """HF CLIP text encoder of SD 1.x: ``forward(list of B str) -> (B, max_length, 768)``.

    ``layer``: "last" = ``last_hidden_state`` (after final_layer_norm), "pooled" = pooled EOS feature
    as (B, 1, 768), "hidden" = ``hidden_states[layer_idx]`` (no final norm), "penultimate" = hidden with
    layer_idx -2 (SDXL). ``version`` selects a known config (no download); a dict of ``CLIPTextConfig``
    kwargs builds a custom (e.g. tiny) model. ``device`` is accepted for config compatibility only.
    ``state_dict()`` / ``load_state_dict()`` use the checkpoint layout whatever transformers is installed.
    """

    LAYERS = ("last", "pooled", "hidden", "penultimate")

    def __init__(self, version="openai/clip-vit-large-patch14", device="cuda", max_length=77, freeze=True,
                 layer="last", layer_idx=None):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        assert layer in self.LAYERS, f"layer must be one of {self.LAYERS}, got {layer!r}"
        if layer == "penultimate":
            layer, layer_idx = "hidden", -2 if layer_idx is None else layer_idx
        if isinstance(version, str):
            if version not in _KNOWN_HF_CONFIGS:
                raise ValueError(f"no offline config for {version!r}; pass a dict of CLIPTextConfig kwargs")
            cfg_kwargs = dict(_KNOWN_HF_CONFIGS[version])
        else:
            cfg_kwargs = dict(_plain_container(version))
        config = CLIPTextConfig(**cfg_kwargs)
        if layer == "hidden":
            assert layer_idx is not None and abs(layer_idx) <= config.num_hidden_layers, \
                f"layer_idx must be in [-{config.num_hidden_layers}, {config.num_hidden_layers}]"
        self.transformer = CLIPTextModel(config)
        _register_layout_hooks(self.transformer)
        self.version = version if isinstance(version, str) else cfg_kwargs
        self.requested_device = device
        self.max_length = max_length
        self.layer = layer
        self.layer_idx = layer_idx
        if freeze:
            self.freeze()

    @property
    def device(self):
        return _module_device(self)

    def freeze(self):
        _freeze(self.transformer)
        for p in self.parameters():
            p.requires_grad = False

    def tokenize(self, text):
        from .tokenizer import get_sd1_tokenizer
        if isinstance(text, str):
            text = [text]
        tokenizer = get_sd1_tokenizer()
        tokens, overflow = tokenizer(list(text), max_length=self.max_length, return_overflow=True)
        for t, dropped in zip(text, overflow):
            if dropped:
                warn_truncated(self, t, len(dropped), tokenizer.decode(dropped), self.max_length)
        return tokens

    def forward(self, text):
        tokens = self.tokenize(text).to(self.device)
        return self.encode_tokens(tokens)

    def encode_tokens(self, tokens):
        out = self.transformer(input_ids=tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return out.last_hidden_state
        if self.layer == "pooled":
            return out.pooler_output[:, None, :]
        return out.hidden_states[self.layer_idx]

    def encode(self, text):
        return self(text)


# --------------------------------------------------------------------------------------------------
# SDXL: OpenCLIP ViT-bigG/14 with pooled output, size/crop embeddings, the conditioner
# --------------------------------------------------------------------------------------------------

class FrozenOpenCLIPEmbedder2(FrozenOpenCLIPEmbedder):
    """OpenCLIP text encoder as SDXL's second embedder uses it (ViT-bigG/14).

    ``legacy=True`` behaves like :class:`FrozenOpenCLIPEmbedder` (stop after ``layer``, then ``ln_final``).
    ``legacy=False`` (SDXL) returns the output of ``layer`` *without* ``ln_final``: "penultimate" is the
    input of the last residual block, "last" its output. With ``always_return_pooled`` (SDXL) the forward
    returns ``(tokens (B, L, width), pooled (B, embed_dim))``, where pooled is ``ln_final`` of the last
    block's output at the end-of-text token (the highest token id), projected by ``text_projection``.
    """

    def __init__(self, arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda", max_length=77,
                 freeze=True, layer="last", always_return_pooled=False, legacy=True):
        super().__init__(arch=arch, version=version, device=device, max_length=max_length, freeze=freeze,
                         layer=layer)
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy: False (the SDXL setting)")
        self.return_pooled = always_return_pooled
        self.legacy = legacy

    def forward(self, text):
        tokens = self.tokenize(text).to(self.device)
        if self.legacy:
            return self.encode_with_transformer(tokens)
        feats = self.encode_layers(tokens)
        return (feats[self.layer], feats["pooled"]) if self.return_pooled else feats[self.layer]

    def encode_layers(self, tokens):
        """{'penultimate', 'last': (B, L, width) block outputs, no ln_final; 'pooled': (B, embed_dim)}."""
        m = self.model
        L = tokens.shape[1]
        x = m.token_embedding(tokens) + m.positional_embedding[:L]
        mask = m.attn_mask[:L, :L].to(device=x.device, dtype=x.dtype)
        tr = m.transformer
        seq_first = not getattr(tr, "batch_first", False)  # open_clip < 2.14 runs (L, B, D)
        if seq_first:
            x = x.transpose(0, 1)
        blocks = list(tr.resblocks)
        for block in blocks[:-1]:
            x = block(x, attn_mask=mask)
        penultimate = x
        last = blocks[-1](x, attn_mask=mask)
        if seq_first:
            penultimate, last = penultimate.transpose(0, 1), last.transpose(0, 1)
        return {"penultimate": penultimate, "last": last, "pooled": self.pool(m.ln_final(last), tokens)}

    def pool(self, x, tokens):
        """Features at the end-of-text token (its id is the largest in every sequence), projected."""
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = self.model.text_projection
        if isinstance(proj, nn.Module):
            return proj(x)
        return x @ proj.to(x.dtype)


class ConcatTimestepEmbedderND(AbstractEncoder):
    """Each of the D numbers of a row gets a sinusoidal embedding of width ``outdim`` ([cos | sin], the
    timestep embedding); the D embeddings are concatenated: (B, D) -> (B, D * outdim). SDXL embeds
    (height, width) of the original size, (top, left) of the crop and (height, width) of the target size
    this way, 256 wide each. No parameters."""

    def __init__(self, outdim=256):
        super().__init__()
        self.outdim = outdim

    def forward(self, x):
        from ldm.modules.diffusionmodules.util import timestep_embedding
        x = torch.as_tensor(x)
        if x.dim() == 1:
            x = x[:, None]
        b, d = x.shape
        emb = timestep_embedding(x.reshape(-1).float(), self.outdim)
        return emb.reshape(b, d * self.outdim)

    def encode(self, x):
        return self(x)


class GeneralConditioner(nn.Module):
    """SDXL's conditioner: a list of embedders (``self.embedders``, so the checkpoint keys are
    ``conditioner.embedders.N.*``), each reading one entry (``input_key``) of a batch dict.

    Every output tensor is routed by its rank: (B, L, D) tensors are concatenated along D into
    ``"crossattn"`` and (B, D) tensors along D into ``"vector"``, in embedder order. For SDXL base that is
    context = [CLIP-L penultimate (768) | bigG penultimate (1280)] = 2048 and
    y = [bigG pooled (1280) | original size (512) | crop (512) | target size (512)] = 2816.

    ``emb_models``: configs with ``target``/``params`` plus ``input_key`` (and, ignored at inference,
    ``is_trainable``/``ucg_rate``). Non-trainable embedders are frozen.
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2}

    def __init__(self, emb_models):
        super().__init__()
        from ldm.util import instantiate_from_config
        embedders, keys = [], []
        for n, cfg in enumerate(emb_models):
            cfg = _plain_container(cfg)
            if "input_key" not in cfg:
                raise KeyError(f"conditioner embedder #{n} ({cfg.get('target')}) needs an input_key")
            emb = instantiate_from_config(cfg)
            if not cfg.get("is_trainable", False):
                _freeze(emb)
                emb.train = partial(disabled_train, emb)
            embedders.append(emb)
            keys.append(cfg["input_key"])
        self.embedders = nn.ModuleList(embedders)
        self.input_keys = keys
        shared = set()  # a prompt cut by both text encoders is reported once
        for emb in embedders:
            emb._truncation_warned = shared

    def forward(self, batch, force_zero_embeddings=None):
        """``batch``: {input_key: value}. ``force_zero_embeddings``: input keys whose embeddings are replaced
        by zeros, as a list (every row) or a dict {input_key: bool tensor (B,)} (the rows marked True)."""
        zero = force_zero_embeddings or {}
        if not isinstance(zero, Mapping):
            zero = {k: None for k in zero}
        out = {}
        for emb, key in zip(self.embedders, self.input_keys):
            res = emb(batch[key])
            for t in (res if isinstance(res, (list, tuple)) else (res,)):
                if key in zero:
                    rows = zero[key]
                    if rows is None:
                        t = torch.zeros_like(t)
                    else:
                        keep = (~torch.as_tensor(rows, dtype=torch.bool, device=t.device)).to(t.dtype)
                        t = t * keep.reshape(-1, *([1] * (t.dim() - 1)))
                out_key = self.OUTPUT_DIM2KEYS[t.dim()]
                out[out_key] = t if out_key not in out else torch.cat((out[out_key], t), self.KEY2CATDIM[out_key])
        return out
