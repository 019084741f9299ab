"""Text encoders: checkpoint key layout, tokenization, layer selection, offline construction.

Full-size models are only built on the meta device; numerics use tiny configs.
"""
import copy
import gzip
import json
import os
import socket

import pytest
import torch
import torch.nn as nn

from ldm.modules.encoders.modules import (
    AbstractEncoder,
    FrozenCLIPEmbedder,
    FrozenOpenCLIPEmbedder,
    IdentityEncoder,
    disabled_train,
)
from ldm.modules.encoders.tokenizer import CLIPBPETokenizer, get_sd1_tokenizer

TINY_OPENCLIP = dict(width=64, layers=3, heads=4, context_length=77, vocab_size=49408, embed_dim=32)
TINY_HFCLIP = dict(vocab_size=49408, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                   num_attention_heads=4, max_position_embeddings=77, hidden_act="quick_gelu",
                   projection_dim=32)
POS_IDS = "transformer.text_model.embeddings.position_ids"

PROMPTS = [
    "a photograph of an astronaut riding a horse",
    "Hello, World!!  What's   UP? (masterpiece:1.2), 8K, f/1.8 ... [ultra-detailed]",
    "Café crème brûlée, naïve façade",
    "don't I'll we're they've 1234567 3.14 #hashtag @user",
    " ".join(["A VERY long prompt, with many words; and punctuation!"] * 12),
    "",
]


def _manifest(ref_dir, name):
    with open(ref_dir / name) as f:
        layout = json.load(f)
    prefix = "cond_stage_model."
    return {k[len(prefix):]: v for k, v in layout.items() if k.startswith(prefix)}


def _shapes(module):
    return {k: list(v.shape) for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- layouts of the full-size models

def test_openclip_full_layout_matches_sd21(ref_dir):
    with torch.device("meta"):
        enc = FrozenOpenCLIPEmbedder(arch="ViT-H-14", version="laion2b_s32b_b79k", device="cuda",
                                     freeze=True, layer="penultimate")
    expected = _manifest(ref_dir, "sd21_base_state_dict.json")
    assert len(expected) == 294
    assert _shapes(enc) == expected
    assert not hasattr(enc.model, "visual")
    # causal mask present (used by forward) but not saved
    assert "attn_mask" in dict(enc.model.named_buffers())
    assert enc.model.attn_mask.shape == (77, 77)
    assert not any(p.requires_grad for p in enc.parameters())


def test_clip_full_layout_matches_sd15(ref_dir):
    with torch.device("meta"):
        enc = FrozenCLIPEmbedder(version="openai/clip-vit-large-patch14", device="cuda")
    expected = _manifest(ref_dir, "sd15_state_dict.json")
    sd = enc.state_dict()
    assert {k: list(v.shape) for k, v in sd.items()} == expected
    assert list(sd) == list(expected)  # even the historical order
    assert sd[POS_IDS].dtype == torch.int64 and sd[POS_IDS].shape == (1, 77)


# ---------------------------------------------------------------- SD1 state-dict translation

def _tiny_clip(**kw):
    return FrozenCLIPEmbedder(version=TINY_HFCLIP, **kw)


def test_clip_state_dict_is_historical_and_round_trips():
    torch.manual_seed(1)
    src = _tiny_clip()
    sd = src.state_dict()
    assert all(k.startswith("transformer.text_model.") for k in sd)
    assert torch.equal(sd[POS_IDS], torch.arange(77)[None]) and sd[POS_IDS].dtype == torch.int64
    ref = src(PROMPTS[:2])

    torch.manual_seed(2)
    dst = _tiny_clip()
    assert not torch.allclose(dst(PROMPTS[:2]), ref)
    dst.load_state_dict(sd, strict=True)
    torch.testing.assert_close(dst(PROMPTS[:2]), ref, rtol=0, atol=0)

    # without position_ids (checkpoints written with transformers >= 4.31)
    no_pos = {k: v for k, v in sd.items() if k != POS_IDS}
    torch.manual_seed(3)
    dst = _tiny_clip()
    dst.load_state_dict(no_pos, strict=True)
    torch.testing.assert_close(dst(PROMPTS[:2]), ref, rtol=0, atol=0)

    # the layout of transformers 5.x (no "text_model." level)
    flat = {k.replace("transformer.text_model.", "transformer."): v for k, v in no_pos.items()}
    dst = _tiny_clip()
    dst.load_state_dict(flat, strict=True)
    torch.testing.assert_close(dst(PROMPTS[:2]), ref, rtol=0, atol=0)

    # a corrupted float position_ids (seen in merged SD1 files) is ignored, not loaded
    bad = dict(sd)
    bad[POS_IDS] = torch.arange(77, dtype=torch.float32)[None] - 0.3
    dst = _tiny_clip()
    dst.load_state_dict(bad, strict=True)
    torch.testing.assert_close(dst(PROMPTS[:2]), ref, rtol=0, atol=0)

    # unknown keys are still reported under strict loading
    with pytest.raises(RuntimeError, match="Unexpected"):
        dst.load_state_dict({**sd, "transformer.text_model.bogus.weight": torch.zeros(1)}, strict=True)


def test_clip_layout_nested_under_a_parent_and_copy():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.cond_stage_model = _tiny_clip()

    torch.manual_seed(4)
    src = Parent()
    sd = src.state_dict()
    assert "cond_stage_model." + POS_IDS in sd
    assert all(k.startswith("cond_stage_model.transformer.text_model.") for k in sd)
    dst = Parent()
    dst.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=True)
    for k, v in dst.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # deepcopy (EMA-style copies) keeps the translation hooks working
    twin = copy.deepcopy(dst)
    assert list(twin.state_dict()) == list(sd)


# ---------------------------------------------------------------- SD1 tokenizer

def _write_hf_vocab(folder):
    """vocab.json/merges.txt of openai/clip-vit-large-patch14, rebuilt from open_clip's BPE file."""
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(tokens)}, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")


def test_sd1_tokenizer_matches_hf_clip_tokenizer(tmp_path):
    from transformers import CLIPTokenizer

    _write_hf_vocab(tmp_path)
    hf = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True, pad_token="<|endoftext|>")
    assert len(hf) == 49408 and hf.pad_token_id == 49407
    expected = hf(PROMPTS, padding="max_length", max_length=77, truncation=True,
                  return_tensors="pt")["input_ids"]
    got = get_sd1_tokenizer()(PROMPTS)
    assert got.dtype == torch.long and got.shape == (len(PROMPTS), 77)
    assert torch.equal(got, expected)
    # known ids for the classic prompt; EOS-padded; truncated prompt still ends with EOS
    assert got[0, :10].tolist() == [49406, 320, 8853, 539, 550, 18376, 6765, 320, 4558, 49407]
    assert (got[0, 9:] == 49407).all()
    assert got[4, -1].item() == 49407 and (got[4, 1:-1] != 49407).all()
    assert got[5, :2].tolist() == [49406, 49407]


def test_sd1_tokenizer_agrees_with_open_clip_up_to_padding():
    import open_clip

    ours = CLIPBPETokenizer(max_length=77)(PROMPTS)
    theirs = open_clip.tokenize(PROMPTS, context_length=77)
    pad = theirs == 0
    assert torch.equal(ours[~pad], theirs[~pad])
    assert (ours[pad] == 49407).all()


def test_sd1_encoder_tokenizes_with_eos_padding():
    enc = _tiny_clip()
    tokens = enc.tokenize(["a cat"])
    assert tokens[0, :4].tolist() == [49406, 320, 2368, 49407]
    assert (tokens[0, 3:] == 49407).all()


# ---------------------------------------------------------------- SD1 layer selection

def test_clip_layers_match_transformers_outputs():
    torch.manual_seed(5)
    last = _tiny_clip(layer="last")
    sd = last.state_dict()
    encs = {"last": last}
    for name, kw in {"pooled": dict(layer="pooled"), "penultimate": dict(layer="penultimate"),
                     "hidden1": dict(layer="hidden", layer_idx=1)}.items():
        encs[name] = _tiny_clip(**kw)
        encs[name].load_state_dict(sd)

    tokens = get_sd1_tokenizer()(PROMPTS[:3])
    with torch.no_grad():
        out = last.transformer(input_ids=tokens, output_hidden_states=True)
        z = {k: e(PROMPTS[:3]) for k, e in encs.items()}
    assert len(out.hidden_states) == TINY_HFCLIP["num_hidden_layers"] + 1
    torch.testing.assert_close(z["last"], out.last_hidden_state, rtol=0, atol=0)
    assert z["last"].shape == (3, 77, 64)
    # last_hidden_state = final_layer_norm(last hidden state)
    torch.testing.assert_close(z["last"], last.transformer.get_submodule(
        "final_layer_norm" if hasattr(last.transformer, "final_layer_norm") else "text_model.final_layer_norm"
    )(out.hidden_states[-1]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z["penultimate"], out.hidden_states[-2], rtol=0, atol=0)
    torch.testing.assert_close(z["hidden1"], out.hidden_states[1], rtol=0, atol=0)
    assert z["pooled"].shape == (3, 1, 64)
    eos = (tokens == 49407).int().argmax(dim=1)
    torch.testing.assert_close(z["pooled"][:, 0], out.last_hidden_state[torch.arange(3), eos], rtol=0, atol=0)


# ---------------------------------------------------------------- SD2 encoder numerics

def test_openclip_layers_match_open_clip_forward():
    import open_clip

    torch.manual_seed(6)
    pen = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate")
    last = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="last")
    last.load_state_dict(pen.state_dict(), strict=True)
    m = pen.model
    assert m.token_embedding.weight.device.type == "cpu"
    assert m.text_projection.shape == (64, 32) and len(m.transformer.resblocks) == 3
    assert torch.equal(m.attn_mask, torch.full((77, 77), float("-inf")).triu(1))

    # independent path: open_clip's own encode_text, capturing the block/ln_final outputs by hooks
    seen = {}
    hooks = [m.transformer.resblocks[-2].register_forward_hook(lambda mod, i, o: seen.__setitem__("pen", o)),
             m.ln_final.register_forward_hook(lambda mod, i, o: seen.__setitem__("last", o))]
    tokens = open_clip.tokenize(PROMPTS[:3])
    try:
        with torch.no_grad():
            m.encode_text(tokens)
    finally:
        for h in hooks:
            h.remove()
    if not getattr(m.transformer, "batch_first", False):
        seen["pen"] = seen["pen"].transpose(0, 1)
    with torch.no_grad():
        z_pen = pen(PROMPTS[:3])
        z_last = last(PROMPTS[:3])
        ref_pen = m.ln_final(seen["pen"])
    assert z_pen.shape == z_last.shape == (3, 77, 64)
    torch.testing.assert_close(z_pen, ref_pen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(z_last, seen["last"], rtol=1e-5, atol=1e-5)
    assert (z_pen - z_last).abs().max() > 1e-2
    # open_clip pads with 0
    assert pen.tokenize(["a cat"])[0, 4:].eq(0).all()
    torch.testing.assert_close(pen.encode(PROMPTS[:1]), z_pen[:1])


def test_openclip_accepts_full_config_dict_and_omegaconf():
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"embed_dim": 16, "text_cfg": {"width": 32, "layers": 2, "heads": 2}})
    enc = FrozenOpenCLIPEmbedder(arch=cfg, layer="last")
    assert enc.model.text_projection.shape == (32, 16)
    assert enc(["x"]).shape == (1, 77, 32)


# ---------------------------------------------------------------- offline, misc

def test_encoders_never_touch_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    get_sd1_tokenizer.cache_clear()  # re-read the BPE file under the patch
    sd2 = FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate")
    sd1 = FrozenCLIPEmbedder(version=TINY_HFCLIP)
    assert sd2.encode(["a red cube"]).shape == (1, 77, 64)
    assert sd1.encode(["a red cube"]).shape == (1, 77, 64)


def test_identity_abstract_and_disabled_train():
    ident = IdentityEncoder()
    x = torch.randn(2, 3)
    assert ident(x) is x and ident.encode(x) is x
    with pytest.raises(NotImplementedError):
        AbstractEncoder().encode(x)
    enc = _tiny_clip(freeze=True)
    assert not enc.transformer.training
    assert not any(p.requires_grad for p in enc.parameters())
    assert enc.device == torch.device("cpu")
    # what LatentDiffusion does to its frozen cond stage: train() can no longer switch modes
    enc.train = disabled_train.__get__(enc)
    assert enc.train(True) is enc and not enc.transformer.training
    unfrozen = _tiny_clip(freeze=False)
    assert all(p.requires_grad for p in unfrozen.parameters())


def test_bad_arguments_are_rejected():
    with pytest.raises(AssertionError):
        FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="pooled")
    with pytest.raises(AssertionError):
        FrozenCLIPEmbedder(version=TINY_HFCLIP, layer="hidden")  # needs layer_idx
    with pytest.raises(ValueError):
        FrozenCLIPEmbedder(version="some/unknown-model")
