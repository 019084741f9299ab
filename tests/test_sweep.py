"""Cluster-scale sampling (scripts/txt2img.py --sweep, torchrun): deterministic whatever the number of
processes, resumable after a kill, with a manifest. The multi-process tests launch 2 CPU workers with the
gloo backend on a tiny random-weight model and compare PNG bytes with a single-process run."""
import hashlib
import json
import os
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from conftest import REPO_ROOT
from ldm.pipelines import sweep
from ldm.inference import UsageError
from ldm.models.diffusion.ddim import DDIMSampler
from test_txt2img import make_ckpt, txt2img

TINY_SD2 = REPO_ROOT / "configs/tiny/tiny-sd2.yaml"
PROMPTS = ["a red circle", "a blue square", "a green tree", "a cat on a mat", "a dog in the snow"]
# 5 prompts x 2 samples = 10 images in batches of 3 (3, 3, 3, 1): batches span prompts, the last is partial
SETTINGS = ["--H", "64", "--W", "64", "--steps", "3", "--ddim_eta", "1", "--n_samples", "3", "--n_iter", "2",
            "--seed", "23", "--scale", "7.5", "--scalecrafter_config", "configs/scalecrafter/sd2.1_1024x1024.yaml"]
EXPECTED = [sweep.image_name(p, k) for p in range(5) for k in range(2)]


# ------------------------------------------------------------------------------------------------
# pieces
# ------------------------------------------------------------------------------------------------
def test_seed_derivation_is_the_documented_hash():
    s = sweep.derive_seed(23, 4, 1)
    digest = hashlib.sha256(b"scalecrafter-sweep:23:4:1").digest()
    assert s == int.from_bytes(digest[:8], "little") & (2 ** 63 - 1)
    assert s == sweep.derive_seed(23, 4, 1) and 0 <= s < 2 ** 63
    seeds = {sweep.derive_seed(b, p, k) for b in range(3) for p in range(20) for k in range(5)}
    assert len(seeds) == 300  # no collisions between neighbouring base seeds / indices
    items = sweep.make_work_list(["x", "y"], 3, 23)
    assert [(it.index, it.prompt_index, it.sample_index, it.file) for it in items][:4] == [
        (0, 0, 0, "000000_000.png"), (1, 0, 1, "000000_001.png"), (2, 0, 2, "000000_002.png"),
        (3, 1, 0, "000001_000.png")]
    fixed = sweep.make_work_list(["x", "y"], 3, 23, fixed_code=True)
    assert [it.seed for it in fixed[:3]] == [it.seed for it in fixed[3:]]  # same noise for every prompt


@pytest.mark.parametrize("world", [1, 2, 3, 7, 64])
def test_shards_cover_every_batch_once(world):
    batches = sweep.make_batches(sweep.make_work_list(PROMPTS, 2, 0), 3)
    assert [len(b) for b in batches] == [3, 3, 3, 1]
    todo = list(range(len(batches)))
    shares = [sweep.shard(todo, r, world) for r in range(world)]
    flat = [b for s in shares for b in s]
    assert sorted(flat) == todo and len(flat) == len(set(flat))


def test_ddim_noise_per_generator_list():
    gens = [torch.Generator().manual_seed(s) for s in (5, 6, 7)]
    x = DDIMSampler._randn((3, 4, 2, 2), torch.device("cpu"), gens)
    for i, s in enumerate((5, 6, 7)):
        assert torch.equal(x[i], torch.randn((4, 2, 2), generator=torch.Generator().manual_seed(s)))
    one = DDIMSampler._randn((1, 4, 2, 2), torch.device("cpu"), [torch.Generator().manual_seed(5)])
    assert torch.equal(one, DDIMSampler._randn((1, 4, 2, 2), torch.device("cpu"), torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        DDIMSampler._randn((3, 4), torch.device("cpu"), gens[:2])


class FakeRender:
    """Stands in for the model: an image whose pixels encode the item's seed; records the batches."""

    def __init__(self):
        self.calls = []

    def __call__(self, items):
        self.calls.append([it.index for it in items])
        return [Image.fromarray(np.full((4, 4, 3), it.seed % 251, np.uint8)) for it in items]


def _read_manifest(outdir):
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def test_resume_skips_complete_images_and_rerenders_partial_batches(tmp_path, capsys):
    settings = {"steps": 3, "seed": 1, "device": "cpu"}
    render = FakeRender()
    res = sweep.run_sweep(render, PROMPTS, 2, 3, 1, tmp_path, settings, progress=False)
    assert res == {"generated": 10, "batches": 4, "skipped": 0, "damaged": 0, "total": 10}
    assert render.calls == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert sorted(os.listdir(tmp_path / "samples")) == EXPECTED
    first = {n: (tmp_path / "samples" / n).read_bytes() for n in EXPECTED}
    man = _read_manifest(tmp_path)
    assert [r["index"] for r in man] == list(range(10))
    assert man[3] == {"index": 3, "file": "samples/000001_001.png", "prompt": "a blue square", "prompt_index": 1,
                      "sample_index": 1, "seed": sweep.derive_seed(1, 1, 1), "base_seed": 1, "settings": settings,
                      "sha256": hashlib.sha256(first["000001_001.png"]).hexdigest()}
    im = Image.open(tmp_path / "samples/000001_001.png")
    assert im.text["prompt"] == "a blue square" and im.text["seed"] == str(sweep.derive_seed(1, 1, 1))
    assert json.loads(im.text["parameters"])["sweep"]["index"] == 3

    # a killed run: one image of batch 1 missing, a temporary file of an unfinished write left behind
    (tmp_path / "samples/000002_000.png").unlink()
    (tmp_path / "samples/.tmp-abc.png").write_bytes(b"\x89PNG partial")
    render = FakeRender()
    capsys.readouterr()
    res = sweep.run_sweep(render, PROMPTS, 2, 3, 1, tmp_path, settings, progress=False)
    assert res == {"generated": 1, "batches": 1, "skipped": 9, "damaged": 0, "total": 10}
    assert render.calls == [[3, 4, 5]]  # the whole batch again, only the missing file written
    assert "9 already complete (skipped)" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "samples")) == EXPECTED  # temporary file removed
    assert {n: (tmp_path / "samples" / n).read_bytes() for n in EXPECTED} == first
    man = _read_manifest(tmp_path)
    assert [r["index"] for r in man] == list(range(10))  # rewritten, no duplicates

    # a complete sweep renders nothing (the device may change); other settings in the same folder are refused
    render = FakeRender()
    res = sweep.run_sweep(render, PROMPTS, 2, 3, 1, tmp_path, {**settings, "device": "cuda"}, progress=False)
    assert res["generated"] == 0 and res["skipped"] == 10
    assert render.calls == []
    with pytest.raises(UsageError, match=r"other settings \(settings\.steps: 3 before, 4 now\)"):
        sweep.run_sweep(render, PROMPTS, 2, 3, 1, tmp_path, {**settings, "steps": 4}, progress=False)
    with pytest.raises(UsageError, match="batch_size: 3 before, 2 now"):
        sweep.run_sweep(render, PROMPTS, 2, 2, 1, tmp_path, settings, progress=False)
    with pytest.raises(UsageError, match="prompts_sha256"):
        sweep.run_sweep(render, PROMPTS[::-1], 2, 3, 1, tmp_path, settings, progress=False)


def test_single_prompt_sweep_in_process(ckpts, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--config", TINY_SD2, "--ckpt", ckpts["sd2"], "--outdir", out, "--steps", "2", "--H", "64", "--W", "64",
            "--prompt", "a corgi", "--n_samples", "2", "--n_iter", "2", "--seed", "7", "--sweep", "--fixed_code"]
    assert txt2img.main([str(a) for a in args]) == 0
    assert sorted(os.listdir(out / "samples")) == [f"000000_00{k}.png" for k in range(4)]
    assert not list(out.glob("grid-*.png"))
    man = _read_manifest(out)
    assert [r["seed"] for r in man] == [sweep.derive_seed(7, 0, k) for k in range(4)]
    assert man[0]["settings"]["fixed_code"] is True
    pix = [np.asarray(Image.open(out / "samples" / f"000000_00{k}.png")) for k in range(4)]
    assert not np.array_equal(pix[0], pix[1])
    assert all(r["sha256"] == hashlib.sha256((out / r["file"]).read_bytes()).hexdigest() for r in man)
    # the same folder with other settings: refused with exit status 2, naming the folder and the difference
    steps = args.index("--steps") + 1
    assert txt2img.main([str(a) for a in args[:steps] + ["3"] + args[steps + 1:]]) == 2
    err = capsys.readouterr().err
    assert f"error: {out} holds a sweep made with other settings (settings.steps: 2 before, 3 now)" in err


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"sd2": make_ckpt.save_checkpoint(make_ckpt.make_random_state_dict(OmegaConf.load(TINY_SD2), seed=3),
                                             d / "tiny-sd2.ckpt")}


# ------------------------------------------------------------------------------------------------
# several processes (torchrun, gloo, CPU)
# ------------------------------------------------------------------------------------------------
def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    env.pop(sweep.KILL_AFTER_ENV, None)
    env.update(extra)
    return env


def _run(cmd, **env):
    return subprocess.run([str(c) for c in cmd], cwd=REPO_ROOT, env=_env(**env), capture_output=True, text=True,
                          timeout=300)


def _torchrun(nproc):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ckpts):
    d = tmp_path_factory.mktemp("sweep")
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:2] + [""] + PROMPTS[2:]) + "\n")  # blank lines do not count
    common = ["--config", TINY_SD2, "--ckpt", ckpts["sd2"], "--from-file", prompts, *SETTINGS]
    ref = d / "single"
    proc = _run([sys.executable, "scripts/txt2img.py", *common, "--sweep", "--outdir", ref])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"dir": d, "prompts": prompts, "common": common, "ref": ref}


def _snapshot(outdir):
    files = sorted(os.listdir(outdir / "samples"))
    return {n: (outdir / "samples" / n).read_bytes() for n in files}


def _check_against_reference(outdir, ref):
    got, want = _snapshot(outdir), _snapshot(ref)
    assert sorted(got) == EXPECTED == sorted(want)  # no duplicate, no missing, no stray file
    assert got == want  # identical PNG bytes: pixels and metadata
    man = _read_manifest(outdir)
    assert [r["index"] for r in man] == list(range(10))
    assert len({r["file"] for r in man}) == 10
    assert (outdir / "manifest.jsonl").read_bytes() == (ref / "manifest.jsonl").read_bytes()


def test_two_processes_equal_one_process_bit_for_bit(setup, tmp_path):
    out = tmp_path / "two"
    proc = _run([*_torchrun(2), "scripts/txt2img.py", *setup["common"], "--outdir", out])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert "[sweep rank 0/2] wrote 6 image(s) in 2 batch(es)" in log
    assert "[sweep rank 1/2] wrote 4 image(s) in 2 batch(es)" in log
    _check_against_reference(out, setup["ref"])
    meta = json.loads(Image.open(out / "samples/000003_001.png").text["parameters"])
    assert meta["sweep"] == {"index": 7, "prompt_index": 3, "sample_index": 1, "samples_per_prompt": 2,
                             "seed_derivation": sweep.SWEEP_FORMAT}
    assert Image.open(out / "samples/000003_001.png").text["seed"] == str(sweep.derive_seed(23, 3, 1))


def test_killed_run_restarted_completes_with_the_same_files(setup, tmp_path):
    out = tmp_path / "killed"
    cmd = [*_torchrun(2), "scripts/txt2img.py", *setup["common"], "--outdir", out]
    # every worker SIGKILLs itself right after writing its first image (mid-batch: batches hold 3 images)
    proc = _run(cmd, **{sweep.KILL_AFTER_ENV: "1"})
    assert proc.returncode != 0
    done = sorted(os.listdir(out / "samples"))
    assert 1 <= len(done) <= 2 and not (out / "manifest.jsonl").exists()
    (out / "samples" / ".tmp-killed.png").write_bytes(b"\x89PNG half written")  # a write cut short
    proc = _run(cmd)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"{len(done)} already complete (skipped)" in proc.stdout
    _check_against_reference(out, setup["ref"])


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_slurm_script_runs_srun_torchrun(setup, tmp_path):
    """shellscripts/slurm_sample.sbatch with stand-ins for srun/scontrol: same files as one process."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\n[ "$1 $2" = "show hostnames" ] && echo localhost\n')
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "slurm"
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "localhost", "SLURM_SUBMIT_DIR": str(REPO_ROOT), "GPUS_PER_NODE": "2",
           "RDZV_PORT": str(_free_port()), "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
           "PROMPTS": str(setup["prompts"]), "MODEL": "sd2.1", "CONFIG": str(TINY_SD2),
           "CKPT": str(setup["common"][3]), "PRESET": "1024x1024", "OUTDIR": str(out), "BATCH": "3", "SAMPLES": "2",
           "SEED": "23"}
    proc = _run(["bash", REPO_ROOT / "shellscripts/slurm_sample.sbatch", "--H", "64", "--W", "64", "--steps", "3"],
                **env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 node(s) x 2 process(es)" in proc.stdout and "[sweep rank 1/2]" in proc.stdout
    _check_against_reference(out, setup["ref"])
