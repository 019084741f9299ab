"""Bad input to scripts/txt2img.py (issue 13, reliability pass): every case ends in one message that names the
input and the fix, exit code 2, and nothing created on disk -- or, where the input is still usable, one warning.

The CLI is called in-process (``main(argv)``) on the tiny SD 2.x config with a random-weight checkpoint."""
import re
import tempfile
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT, load_script
from ldm.checkpoint import CheckpointError, load_state_dict_file
from ldm.inference import InputWarning, read_prompt_file
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder
from ldm.modules.encoders.word_embedder import WordEmbedder
from ldm.util import instantiate_from_config

TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
TINY_SDXL = REPO_ROOT / "configs/tiny/tiny-sdxl.yaml"
TINY_OPENCLIP = dict(width=32, layers=1, heads=2, context_length=77, vocab_size=49408, embed_dim=32)
TINY_HFCLIP = dict(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                   num_attention_heads=2, max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=32)
# 90 x "cat" (one BPE token each, checked below): 90 tokens, the encoders take 77 - 2 (start, end) -> 15 dropped
LONG_PROMPT = " ".join(["cat"] * 90)

txt2img = load_script("txt2img")
from ldm.pipelines import txt2img as pipeline  # noqa: E402  (what the script runs: patched below)
make_ckpt = load_script("make_random_checkpoint")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SD2), seed=1),
                                     d / "tiny-sd2.ckpt")


def cli(capsys, *args):
    """Run txt2img in-process; returns (exit code, stdout, stderr)."""
    code = txt2img.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def base_args(ckpt, outdir, *extra, config=TINY_SD2):
    return ["--config", config, "--ckpt", ckpt, "--outdir", outdir, "--steps", "2", "--H", "64", "--W", "64",
            "--prompt", "a red circle", *extra]


def assert_one_error(code, out, err, *needles):
    """Exit code 2, a single 'error:' message (no traceback) containing every needle, no 'samples ready'."""
    assert code == 2, (out, err)
    assert "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert err.lstrip().startswith("error:"), err
    for needle in needles:
        assert needle in err, (needle, err)
    assert "samples are ready" not in out


# ------------------------------------------------------------------------------------------------ numbers

@pytest.mark.parametrize("args, needles", [
    (["--H", "0"], ["--H 0", "positive multiple of 8"]),
    (["--W", "0"], ["--W 0", "positive multiple of 8"]),
    (["--H", "-64"], ["--H -64", "positive multiple of 8"]),
    (["--ddim_eta", "2"], ["--ddim_eta 2", "[0, 1]", "0 <= eta <= 1", "DDPM-like"]),
    (["--ddim_eta", "-0.5"], ["--ddim_eta -0.5", "[0, 1]"]),
    (["--n_iter", "0"], ["--n_iter 0", "at least 1"]),
    (["--n_samples", "0"], ["--n_samples 0", "at least 1", "batch size"]),
    (["--steps", "0"], ["--steps 0", "between 1 and 1000"]),
    (["--steps", "-3"], ["--steps -3", "between 1 and 1000"]),
    (["--steps", "2000"], ["--steps 2000", "between 1 and 1000", "1000 training timesteps"]),
])
def test_bad_numbers_fail_before_loading_and_create_nothing(ckpt, tmp_path, capsys, args, needles):
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(ckpt, out_dir), *args)
    assert_one_error(code, out, err, *needles)
    assert "nearest valid sizes" not in err  # the old "-64 is not a multiple of 8, nearest 8 or 8"
    assert "Loaded" not in out  # rejected before the model was built
    assert not out_dir.exists()


def _schedule_model(T=1000):
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return SimpleNamespace(num_timesteps=T, betas=betas.float(), alphas_cumprod=ac.float(),
                           alphas_cumprod_prev=torch.cat([torch.ones(1), ac[:-1]]).float())


def test_ddim_sampler_rejects_eta_outside_0_1():
    sampler = DDIMSampler(_schedule_model())
    for eta in (1.5, 2.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
            sampler.make_schedule(10, ddim_eta=eta, verbose=False)
        with pytest.raises(ValueError, match="eta"):
            sampler.sample(S=10, batch_size=1, shape=(4, 8, 8), eta=eta, verbose=False)
    for eta in (0.0, 0.5, 1.0):  # the valid range, ends included: finite sigmas within the step's variance
        sampler.make_schedule(10, ddim_eta=eta, verbose=False)
        sig = np.asarray(sampler.ddim_sigmas, dtype=np.float64)
        assert np.all(np.isfinite(sig))
        assert np.all(sig ** 2 <= 1 - np.asarray(sampler.ddim_alphas_prev, dtype=np.float64) + 1e-6)


# ------------------------------------------------------------------------------------------------ prompts

def test_long_prompt_warns_once_per_run_with_dropped_token_count(ckpt, tmp_path, capsys):
    from open_clip.tokenizer import _tokenizer
    assert len(_tokenizer.encode(LONG_PROMPT)) == 90  # precondition of the expected count below
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(ckpt, out_dir, "--n_samples", "2", "--n_iter", "2", "--prompt", LONG_PROMPT))
    assert code == 0, err
    lines = [line for line in err.splitlines() if "truncated" in line]
    assert len(lines) == 1, err  # 2 iterations x (cond + uncond) encodings, one warning
    assert lines[0].startswith("warning: The following part of your input was truncated because CLIP can only "
                               "handle sequences up to 77 tokens"), lines[0]
    assert "15 token(s) dropped" in lines[0]
    assert len(list((out_dir / "samples").glob("*.png"))) == 4
    # a short prompt: no warning
    code, out, err = cli(capsys, *base_args(ckpt, out_dir))
    assert code == 0 and "truncated" not in err


def _input_warnings(fn):
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fn()
    return [w for w in rec if issubclass(w.category, InputWarning)]


@pytest.mark.parametrize("make", [
    lambda: FrozenCLIPEmbedder(version=TINY_HFCLIP),  # SD 1.x (Hugging Face CLIP layout, own BPE tokenizer)
    lambda: FrozenOpenCLIPEmbedder(arch=TINY_OPENCLIP, layer="penultimate"),  # SD 2.x (open_clip tokenizer)
], ids=["sd1-clip", "sd2-openclip"])
def test_text_encoders_warn_about_truncation(make):
    enc = make()
    got = _input_warnings(lambda: enc.tokenize([LONG_PROMPT, "a short prompt"]))
    assert len(got) == 1
    msg = str(got[0].message)
    assert "truncated because CLIP can only handle sequences up to 77 tokens" in msg
    assert "15 token(s) dropped" in msg and "cat" in msg
    assert _input_warnings(lambda: enc.tokenize(LONG_PROMPT)) == []  # once per prompt and loaded model
    assert _input_warnings(lambda: make().tokenize("a short prompt")) == []
    # 75 tokens fit exactly (start + 75 + end = 77): no warning
    assert _input_warnings(lambda: make().tokenize(" ".join(["cat"] * 75))) == []
    assert len(_input_warnings(lambda: make().tokenize(" ".join(["cat"] * 76)))) == 1


def test_sdxl_conditioner_warns_once_for_both_text_encoders():
    cfg = OmegaConf.load(TINY_SDXL).model.params.conditioner_config
    cond = instantiate_from_config(cfg)
    size = torch.tensor([[64, 64]])
    batch = {"txt": [LONG_PROMPT], "original_size_as_tuple": size, "crop_coords_top_left": torch.tensor([[0, 0]]),
             "target_size_as_tuple": size}
    got = _input_warnings(lambda: cond(batch))
    assert len(got) == 1, [str(w.message) for w in got]  # CLIP-L and bigG both cut it; reported once
    assert "15 token(s) dropped" in str(got[0].message)


def test_demo_word_embedder_names_the_dropped_words():
    emb = WordEmbedder(vocab=["a", "red", "blue", "circle"], max_length=3)
    got = _input_warnings(lambda: emb.tokenize("a red blue circle"))
    assert len(got) == 1 and "at most 3" in str(got[0].message) and "'circle'" in str(got[0].message)
    assert _input_warnings(lambda: emb.tokenize("a red blue circle")) == []  # once per prompt


def test_prompt_file_not_utf8_names_file_and_offset(ckpt, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("a red circle\na blue caf\xe9\n".encode("latin-1"))
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(ckpt, out_dir, "--from-file", prompts))
    assert_one_error(code, out, err, str(prompts), "not UTF-8", "offset 23", "line 2", "0xe9")
    assert not out_dir.exists()


def test_prompt_file_with_byte_order_mark(tmp_path):
    prompts = tmp_path / "bom.txt"
    prompts.write_bytes("\ufeffa red circle\n".encode("utf-8"))
    assert read_prompt_file(prompts) == ["a red circle"]


# ------------------------------------------------------------------------------------------------ checkpoints

def _truncated(src, dst, **save_kwargs):
    if save_kwargs:
        torch.save(torch.load(src, weights_only=True), dst, **save_kwargs)
        src = dst
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[:len(data) // 2])
    return dst


@pytest.mark.parametrize("kind, needles", [
    ("text", ["notes.ckpt", "is not a checkpoint", "text file"]),
    ("text+unsafe", ["notes.ckpt", "is not a checkpoint"]),
    ("lfs", ["is not a checkpoint", "Git LFS pointer"]),
    ("html", ["is not a checkpoint", "HTML"]),
    ("empty", ["notes.ckpt", "empty"]),
    ("truncated-zip", ["half.ckpt", "truncated or corrupt", "again"]),
    ("truncated-legacy", ["half.ckpt", "truncated or corrupt", "again"]),
    ("bad-safetensors", ["bad.safetensors", "not a valid .safetensors", "header"]),
])
def test_broken_checkpoint_files(ckpt, tmp_path, capsys, kind, needles):
    out_dir = tmp_path / "out"
    extra = []
    if kind.startswith("text"):
        path = tmp_path / "notes.ckpt"
        path.write_text("my notes about the model\n")
        extra = ["--unsafe_load"] if kind.endswith("unsafe") else []
    elif kind == "lfs":
        path = tmp_path / "v2-1_512-ema-pruned.ckpt"
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0123\nsize 5214865159\n")
    elif kind == "html":
        path = tmp_path / "model.ckpt"
        path.write_text("<!DOCTYPE html><html><body>Sign in to download</body></html>")
    elif kind == "empty":
        path = tmp_path / "notes.ckpt"
        path.write_bytes(b"")
    elif kind == "truncated-zip":
        path = _truncated(ckpt, tmp_path / "half.ckpt")
    elif kind == "truncated-legacy":
        path = _truncated(ckpt, tmp_path / "half.ckpt", _use_new_zipfile_serialization=False)
    else:
        from safetensors.torch import save_file
        path = tmp_path / "bad.safetensors"
        save_file({"x": torch.zeros(3)}, str(path))
        data = bytearray(path.read_bytes())
        data[8] = ord("#")  # the JSON header no longer parses
        path.write_bytes(bytes(data))
    code, out, err = cli(capsys, *base_args(path, out_dir, *extra))
    assert_one_error(code, out, err, *needles)
    assert "--unsafe_load" not in err  # never the advice to unpickle a file that is no pickle at all
    assert not out_dir.exists()
    with pytest.raises(CheckpointError):
        load_state_dict_file(path, allow_unsafe=True)


class NotATensor:
    pass


def test_unsafe_load_warns_naming_the_file(ckpt, tmp_path, capsys):
    sd = torch.load(ckpt, weights_only=True)
    sd["callbacks"] = NotATensor()
    path = tmp_path / "pickled.ckpt"
    torch.save(sd, path)
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(path, out_dir))
    assert_one_error(code, out, err, "pickled.ckpt", "--unsafe_load")
    assert not out_dir.exists()
    code, out, err = cli(capsys, *base_args(path, out_dir, "--unsafe_load"))
    assert code == 0, err
    warned = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and str(path) in warned[0] and "unpickling" in warned[0]
    with pytest.warns(InputWarning, match="pickled.ckpt.*unpickling"):
        load_state_dict_file(path, allow_unsafe=True)


# ------------------------------------------------------------------------------------------------ output folder

@pytest.fixture
def no_model_loading(monkeypatch):
    """The output folder must be checked before the model is loaded: loading fails the test."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the output folder was checked")
    monkeypatch.setattr(pipeline, "load_model_from_config", refuse)


def test_outdir_is_an_existing_file(ckpt, tmp_path, capsys, no_model_loading):
    target = tmp_path / "results.txt"
    target.write_text("keep me")
    code, out, err = cli(capsys, *base_args(ckpt, target))
    assert_one_error(code, out, err, str(target), "existing file", "folder")
    assert target.read_text() == "keep me"


def test_outdir_below_a_file(ckpt, tmp_path, capsys, no_model_loading):
    """The realistic 'cannot be created' case that holds even for root: a parent that is a file."""
    parent = tmp_path / "results.txt"
    parent.write_text("keep me")
    code, out, err = cli(capsys, *base_args(ckpt, parent / "out"))
    assert_one_error(code, out, err, str(parent / "out"), f"{parent} is a file")
    assert parent.read_text() == "keep me"


def test_outdir_samples_is_a_file(ckpt, tmp_path, capsys, no_model_loading):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "samples").write_text("x")
    code, out, err = cli(capsys, *base_args(ckpt, out_dir))
    assert_one_error(code, out, err, "samples", "existing file")


def test_outdir_not_writable_simulated(ckpt, tmp_path, capsys, monkeypatch, no_model_loading):
    """Tests run as root, where chmod does not stop writes: this only simulates the permission check
    (os.access says no for the folder) and shows that it leads to the message, before loading."""
    import ldm.inference as inference
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = inference.os.access
    monkeypatch.setattr(inference.os, "access",
                        lambda p, mode, **k: False if Path(p) == locked else real_access(p, mode, **k))
    code, out, err = cli(capsys, *base_args(ckpt, locked / "out"))
    assert_one_error(code, out, err, str(locked / "out"), "not writable", "no write permission")
    assert list(locked.iterdir()) == []


def test_outdir_not_writable_for_real(ckpt, capsys, no_model_loading):
    """A folder the kernel refuses writes to even for root (sysfs); skipped where that does not hold."""
    try:
        fd, probe = tempfile.mkstemp(dir="/sys")
    except OSError:
        pass
    else:
        import os
        os.close(fd)
        os.unlink(probe)
        pytest.skip("/sys is writable here")
    code, out, err = cli(capsys, *base_args(ckpt, "/sys/ldm-test-out"))
    assert_one_error(code, out, err, "/sys/ldm-test-out", "not writable")


def test_stale_temp_files_are_removed_at_start(ckpt, tmp_path, capsys):
    out_dir = tmp_path / "out"
    (out_dir / "samples").mkdir(parents=True)
    stale = [out_dir / "samples" / ".tmp-k1llED.png", out_dir / ".tmp-gr1d.png"]
    for f in stale:
        f.write_bytes(b"\x89PNG partial")
    keep = [out_dir / "samples" / ".tmp-notes.txt", out_dir / "samples" / "mine.png"]
    for f in keep:
        f.write_bytes(b"x")
    code, out, err = cli(capsys, *base_args(ckpt, out_dir))
    assert code == 0, err
    assert not any(f.exists() for f in stale)
    assert all(f.exists() for f in keep)
    assert (out_dir / "samples" / "00000.png").is_file()


# ------------------------------------------------------------------------------------------------ Ctrl-C

def _no_temp_files(folder):
    return [p for p in Path(folder).rglob(".tmp-*")]


def test_ctrl_c_while_writing_the_second_image(ckpt, tmp_path, capsys, monkeypatch):
    """Ctrl-C arrives inside save_png, after the temp file was started: it must not stay behind."""
    real_save = pipeline.save_png
    calls = []

    class Interrupting:
        def save(self, fp, *args, **kwargs):
            if hasattr(fp, "write"):
                fp.write(b"\x89PNG half-written")
                fp.flush()
            else:
                Path(fp).write_bytes(b"\x89PNG half-written")
            raise KeyboardInterrupt

    def save_png(img, path, meta=None):
        calls.append(path)
        if len(calls) == 2:
            return real_save(Interrupting(), path, meta)
        return real_save(img, path, meta)

    monkeypatch.setattr(pipeline, "save_png", save_png)
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(ckpt, out_dir, "--n_iter", "3"))
    assert code == 130
    assert "Traceback" not in err
    assert "interrupted after 1 of 3 images; re-run to continue" in err
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["00000.png"]
    assert _no_temp_files(out_dir) == []
    assert not list(out_dir.glob("grid-*.png")) and "samples are ready" not in out


def _interrupt_sampling_after(monkeypatch, n_ok):
    real = DDIMSampler.sample
    calls = []

    def sample(self, *a, **k):
        calls.append(1)
        if len(calls) > n_ok:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(DDIMSampler, "sample", sample)


def test_ctrl_c_during_sampling(ckpt, tmp_path, capsys, monkeypatch):
    _interrupt_sampling_after(monkeypatch, 1)
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(ckpt, out_dir, "--n_iter", "2", "--n_samples", "2"))
    assert code == 130 and "Traceback" not in err
    assert "interrupted after 2 of 4 images; re-run to continue" in err
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["00000.png", "00001.png"]
    assert _no_temp_files(out_dir) == []


def test_ctrl_c_before_the_first_image_leaves_no_empty_folders(ckpt, tmp_path, capsys, monkeypatch):
    _interrupt_sampling_after(monkeypatch, 0)
    out_dir = tmp_path / "out"
    code, out, err = cli(capsys, *base_args(ckpt, out_dir))
    assert code == 130 and "interrupted after 0 of 1 images" in err
    assert not out_dir.exists()


def test_ctrl_c_in_a_sweep_and_resume(ckpt, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as m:
        _interrupt_sampling_after(m, 1)
        out_dir = tmp_path / "out"
        code, out, err = cli(capsys, *base_args(ckpt, out_dir, "--sweep", "--n_iter", "3"))
    assert code == 130 and "Traceback" not in err
    assert "interrupted after 1 of 3 images; re-run to continue" in err
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == ["000000_000.png"]
    assert _no_temp_files(out_dir) == []
    code, out, err = cli(capsys, *base_args(ckpt, out_dir, "--sweep", "--n_iter", "3"))  # "re-run to continue"
    assert code == 0, err
    assert sorted(p.name for p in (out_dir / "samples").iterdir()) == [f"000000_00{k}.png" for k in range(3)]
    assert "1 already complete" in out


# ------------------------------------------------------------------------------------------------ --help

def test_help_shows_each_default_once():
    text = " ".join(txt2img.build_parser().format_help().split())
    assert re.search(r"\(default: [^)]*\) \(default", text) is None, text
    assert "(default: None)" not in text and "(default: False)" not in text and "(default: )" not in text
    assert "(0: n_samples) (default: 0)" in text  # --n_rows
    assert "(default: 50)" in text  # --steps keeps its automatic default
