"""The demo model: shipped checkpoint, word encoder, and the training entry point (main.py)."""
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from ldm.checkpoint import load_model_from_config  # noqa: E402
from ldm.data.shapes import CAPTIONS, VOCAB  # noqa: E402
from ldm.models.diffusion.ddim import DDIMSampler  # noqa: E402
from ldm.modules.encoders.word_embedder import PAD_ID, UNK_ID, UnknownWordError, WordEmbedder  # noqa: E402
from ldm.methods.scalecrafter.guidance import ScaleCrafterGuidance  # noqa: E402
from ldm.methods.scalecrafter.presets import plan_from_preset  # noqa: E402

CONFIG = REPO_ROOT / "configs/demo/shapes32.yaml"
CKPT = REPO_ROOT / "checkpoints/demo/shapes32.ckpt"


# ----------------------------------------------------------------------------------------------
# word encoder


def test_word_embedder_tokenises_captions():
    enc = WordEmbedder(vocab=VOCAB, embed_dim=16, max_length=4)
    tok = enc.tokenize(["a red circle", "A Yellow  triangle.", ""])
    assert tok.shape == (3, 4) and tok.dtype == torch.long
    assert tok[0, :3].tolist() == [enc.word_to_id[w] for w in ("a", "red", "circle")]
    assert tok[0, 3] == PAD_ID
    assert tok[1].tolist() == enc.tokenize("a yellow triangle")[0].tolist()  # case and punctuation
    assert tok[2].tolist() == [PAD_ID] * 4  # "" is the unconditional prompt
    assert UNK_ID not in tok
    ctx = enc(CAPTIONS)
    assert ctx.shape == (len(CAPTIONS), 4, 16) and torch.isfinite(ctx).all()


def test_word_embedder_rejects_unknown_words_clearly():
    enc = WordEmbedder(vocab=VOCAB, embed_dim=16, max_length=4)
    with pytest.raises(UnknownWordError) as err:
        enc.tokenize("a purple circle")
    msg = str(err.value)
    assert "purple" in msg and all(w in msg for w in VOCAB)
    lenient = WordEmbedder(vocab=VOCAB, embed_dim=16, max_length=4, unknown="warn")
    with pytest.warns(UserWarning, match="purple"):
        tok = lenient.tokenize("a purple circle")
    assert tok[0, 1] == UNK_ID


# ----------------------------------------------------------------------------------------------
# shipped checkpoint


@pytest.fixture(scope="module")
def demo_model():
    if not CKPT.is_file():
        pytest.fail(f"the demo checkpoint {CKPT} is missing (it is committed; see checkpoints/demo/README.md)")
    torch.set_num_threads(2)
    return load_model_from_config(OmegaConf.load(CONFIG), str(CKPT), strict=True)


def _sample(model, guidance, side=64, steps=6):
    torch.manual_seed(0)
    x_t = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(5))
    c = model.get_learned_conditioning(["a red circle"])
    uc = model.get_learned_conditioning([""])
    z, _ = DDIMSampler(model).sample(S=steps, conditioning=c, batch_size=1, shape=(3, side, side), verbose=False,
                                     unconditional_guidance_scale=3.0, unconditional_conditioning=uc, eta=1.0,
                                     x_T=x_t, guidance=guidance, generator=torch.Generator().manual_seed(6))
    return model.decode_first_stage(z)


def test_shipped_checkpoint_samples_2x_with_and_without_redilation(demo_model):
    unet = demo_model.model.diffusion_model
    assert all(p.dtype == torch.float32 for p in demo_model.parameters())  # fp16 file, upcast on load
    direct = _sample(demo_model, None)
    plan = plan_from_preset(unet, REPO_ROOT / "configs/scalecrafter/demo_64x64.yaml")
    assert plan.dilate.factors and all(f == 2 for f in plan.dilate.factors.values())
    dilated = _sample(demo_model, ScaleCrafterGuidance(plan))
    assert direct.shape == dilated.shape == (1, 3, 64, 64)
    assert torch.isfinite(direct).all() and torch.isfinite(dilated).all()
    assert (direct - dilated).abs().max() > 1e-3  # re-dilation changed the result
    # the convs are restored after sampling
    assert all("forward" not in m.__dict__ for m in unet.modules())


def test_demo_presets_resolve_on_the_demo_unet(demo_model):
    unet = demo_model.model.diffusion_model
    plan = plan_from_preset(unet, REPO_ROOT / "configs/scalecrafter/demo_128x128.yaml")
    assert plan.dilate.factors and max(plan.dilate.factors.values()) == 4


# ----------------------------------------------------------------------------------------------
# training entry point


TINY = """
model:
  params:
    image_size: 16
    unet_config:
      params:
        image_size: 16
        channel_mult: [1, 2]
        attention_resolutions: [2]
        context_dim: 32
    cond_stage_config:
      params:
        embed_dim: 32
data:
  batch_size: 4
  params: {size: 16, length: 64}
lightning:
  warmup_steps: 2
  trainer:
    max_steps: 2
"""


def test_main_trains_two_steps_and_writes_loadable_checkpoints(tmp_path):
    import main as train_main
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    base = [str(CONFIG), str(tiny)]
    config = OmegaConf.merge(*[OmegaConf.load(b) for b in base])
    logdir = tmp_path / "logs"
    rc = train_main.main(["--base", *base, "-t", "--logdir", str(logdir), "--name", "tiny", "--save_every", "1",
                          "--accelerator", "cpu"])
    assert rc == 0
    last = logdir / "tiny" / "checkpoints" / "last.ckpt"
    obj = torch.load(last, map_location="cpu", weights_only=True)
    assert obj["global_step"] == 2
    assert any(k.startswith("model_ema.diffusion_model") for k in obj["state_dict"])
    assert "optimizer_states" in obj
    # the original loader takes it strictly and swaps in the EMA weights
    model = load_model_from_config(config, str(last), strict=True)
    assert model.model.diffusion_model.out[2].weight.shape[0] == 3
    # resume for one more step
    rc = train_main.main(["--base", *base, "-t", "--logdir", str(logdir), "--name", "tiny", "--max_steps", "3",
                          "--resume", str(last), "--accelerator", "cpu"])
    assert rc == 0
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    # release export: EMA baked in, fp16, strict-loadable
    out = tmp_path / "release.ckpt"
    assert train_main.main(["--base", *base, "--export", str(last), "--out", str(out)]) == 0
    rel = torch.load(out, map_location="cpu", weights_only=True)
    assert not any(k.startswith("model_ema.") for k in rel["state_dict"])
    assert rel["state_dict"]["model.diffusion_model.out.2.weight"].dtype == torch.float16
    load_model_from_config(config, str(out), strict=True)


def test_main_warm_start_copies_matching_tensors_only(tmp_path):
    """--init_from: tensors whose name and shape match are copied, the others keep a fresh init, EMA = weights."""
    import main as train_main
    tiny = tmp_path / "tiny.yaml"
    tiny.write_text(TINY)
    base = [str(CONFIG), str(tiny)]
    logdir = tmp_path / "logs"
    assert train_main.main(["--base", *base, "-t", "--logdir", str(logdir), "--name", "a", "--accelerator", "cpu"]) == 0
    src = torch.load(logdir / "a" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    # the same model with self-attention switched on (the demo config has it off): attn1's key/value
    # projections take the features (64 wide here) instead of the caption embedding (32)
    tiny2 = tmp_path / "tiny2.yaml"
    tiny2.write_text("model:\n  params:\n    unet_config:\n      params:\n"
                     "        disable_self_attentions: [false, false]\n        disable_middle_self_attn: false\n")
    config = OmegaConf.merge(*[OmegaConf.load(b) for b in base + [str(tiny2)]])
    model = train_main.build_model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_main.warm_start(model, str(logdir / "a" / "checkpoints" / "last.ckpt"))
    after = model.state_dict()
    k_same = "model.diffusion_model.input_blocks.0.0.weight"
    k_new = "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_k.weight"
    assert torch.equal(after[k_same], src[k_same])
    assert src[k_new].shape != after[k_new].shape and torch.equal(after[k_new], before[k_new])
    ema = model.model_ema
    pairs = list(ema._params())
    assert pairs and all(torch.equal(getattr(ema, buf), p) for buf, p in pairs)
    assert int(ema.num_updates) == 0
