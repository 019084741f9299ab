"""The estimate of every method's CUDA memory without a GPU (``scripts/benchmark.py methods --simulate``,
``tools/simulation.py``): the real txt2img pipeline on fake CUDA tensors, on the tiny SDXL config. Checked against
what the run must hold whatever the code decides (the weights from the configs' parameter counts and the casting
rule, the text encoders off the GPU with --lowvram, the image size) and against its own measurements under two
cards (a smaller card gives fewer windows per UNet call, a smaller measured sampling peak and a tiled decode)."""
import os

import torch
from omegaconf import OmegaConf

from conftest import REPO_ROOT as REPO, load_script
from tools.fake_cuda import ALLOCATOR_GRANULARITY

GiB = 2 ** 30
TINY = REPO / "configs/tiny/tiny-sdxl.yaml"
TINY_X4 = REPO / "configs/tiny/tiny-x4-upscaler.yaml"
HALF_MODULES = ("model", "cond_stage_model", "conditioner")  # --precision half: these in float16, the rest as built


def expected_weights(config_path):
    """(bytes of every parameter and buffer after the half-precision cast, bytes of the text encoders, tensors)."""
    from ldm.util import instantiate_from_config
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(config_path).model)
    total = text = count = 0
    for top, module in model.named_children():
        for t in list(module.parameters()) + list(module.buffers()):
            size = 2 if top in HALF_MODULES and t.is_floating_point() else t.element_size()
            total += t.numel() * size
            count += 1
            if top in ("cond_stage_model", "conditioner"):
                text += t.numel() * size
    for t in model.buffers(recurse=False):
        total += t.numel() * t.element_size()
        count += 1
    return total, text, count


def simulate(*args):
    """The simulation in a process of its own: fake CUDA mode leaves process state behind (random checkpoints made
    after it in the same process get other weights, so tests/test_pinned_outputs.py's images differed; loading,
    encoding and sampling a given checkpoint are unaffected), so it never runs in the test's process."""
    import json
    import subprocess
    import sys
    code = ("import json, sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; from conftest import load_script; "
            "res = load_script('benchmark').main(sys.argv[3:]); "
            "print('SIMULATION ' + json.dumps({repr(k): v for k, v in res.items()}))")
    argv = ["methods", "--simulate", "--config", str(TINY), "--steps", "1", *args]
    out = subprocess.run([sys.executable, "-c", code, str(REPO / "tests"), str(REPO), *argv], capture_output=True,
                         text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("SIMULATION ")][-1]
    return {float(k): v for k, v in json.loads(line[len("SIMULATION "):]).items()}


def test_every_method_within_a_small_card_with_lowvram():
    cap = 0.05  # GiB: weights 0.025, so the decoder must tile and the windows be sized to what is left
    res = simulate("--size", "128", "--cards", f"{cap}:--lowvram --precision half",
                   "--extra", f"sdsr=--sr_config {TINY_X4}", "scalecrafter=--dilate 2 --dilate_tau 1")
    rows = {r["method"]: r for r in res[cap]}
    from ldm import methods as registry
    assert set(rows) == set(registry.names())
    base, text, n_base = expected_weights(TINY)
    x4, _, n_x4 = expected_weights(TINY_X4)
    for name, r in rows.items():
        assert "error" not in r, (name, r.get("error"))
        assert r["images"] == [[3, 128, 128]], name  # SD+SR: 32² base image, x4
        expected = base + x4 if name == "sdsr" else base
        assert abs(r["weights_gib"] * GiB - expected) <= 0, name
        assert r["peak_gib"] <= cap, (name, r["peak_gib"])
        assert r["fits"]
        # the sampling holds at least the UNet's weights, which stay on the GPU with --lowvram
        assert r["phases"]["sampling"] >= r["resident_gib"] > 0
        assert r["plans"] and all(p["plan"].startswith("tiled") for p in r["plans"]), name
    # --lowvram: the text encoders are in host memory when the first method's sampling starts (later methods
    # also hold the float16 copy of the VAE decoder that the first decode made); allocations round up to 512 bytes
    direct = rows["direct"]
    assert abs(direct["resident_gib"] * GiB - (base - text)) <= ALLOCATOR_GRANULARITY * n_base
    assert direct["phases"]["text encoders"] * GiB >= base - ALLOCATOR_GRANULARITY * n_base  # all of them then
    assert rows["sdsr"]["phases"]["upscaling"] > 0
    # the first run loads the model: --precision half casts in host memory, so the GPU never holds float32 weights
    assert direct["phases"]["loading"] * GiB <= base + ALLOCATOR_GRANULARITY * n_base


def test_the_loader_casts_before_moving():
    from ldm.checkpoint import load_model_from_config
    model = load_model_from_config(OmegaConf.load(TINY), None, device="cpu", weights_dtype=torch.float16)
    for top, module in model.named_children():
        dtypes = {p.dtype for p in module.parameters()}
        if dtypes:  # (the denoiser has none)
            assert dtypes == ({torch.float16} if top in HALF_MODULES else {torch.float32}), top
    assert {p.dtype for p in model.model.parameters()} == {torch.float16}


def test_a_smaller_card_gets_fewer_windows_and_a_tiled_decode():
    res = simulate("--size", "128", "--methods", "multidiffusion", "--cards", "1:--lowvram --precision half",
                   "0.0196:--lowvram --precision half")
    big, small = res[1.0][0], res[0.0196][0]
    assert "error" not in big and "error" not in small
    requested = 8  # --md_batch's default
    assert [(b["requested"], b["chosen"]) for b in big["batches"]] == [(requested, requested)]
    assert all(b["requested"] == requested and 1 <= b["chosen"] < requested for b in small["batches"])
    # fewer windows per UNet call: a smaller measured sampling peak
    assert small["phases"]["sampling"] < big["phases"]["sampling"]
    assert big["plans"][0]["plan"].startswith("one piece")
    assert small["plans"][0]["plan"].startswith("tiled")
