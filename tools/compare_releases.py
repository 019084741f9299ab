#!/usr/bin/env python
"""Side by side with the authors' pipelines: time per image and peak memory, the release vs this repository,
the same random weights, size, steps, seed and prompt, in one run.

    python tools/compare_releases.py run --scale reduced --release scalecrafter=PATH freescale=PATH \\
        demofusion=PATH --write docs/benchmarks.md --key releases-cpu-reduced
    python tools/compare_releases.py run --scale full --device cuda ...          # the GPU table
    python tools/compare_releases.py download --dest DIR --release ...   # wheels for an offline (GPU) machine

For every case (``--cases``; ``CASES`` below) it

1. writes one random-weight model twice (tools/release_models.py): a diffusers folder for the release and the
   same tensors in this repository's layout (``.safetensors`` + config) for this side;
2. makes a throwaway virtual environment per set of pins (``--env``, default ~/.cache/ldm-release-envs; reused
   when the pins are the same) with the release's ``requirements.txt`` (see ``release_pins`` for the lines left
   out or added, and why) and runs tools/release_runner.py there on the release's checkout (``--release
   NAME=PATH``: a checkout or a bare git directory, exported once into the env folder);
3. runs this repository's ``scripts/txt2img.py`` pipeline (``ldm.pipelines.txt2img.run``) in a child process of
   this environment with the matching method, preset and sampler;
4. prints / writes the table: time per image (the pipeline call: text encoding, sampling, decoding; not the
   loading), time inside the UNet, its batch elements, peak memory (CUDA: ``torch.cuda.max_memory_allocated`` /
   ``max_memory_reserved`` since the weights were loaded; CPU: the process's peak resident memory, VmHWM, weights
   and Python included) and the ratios ours / theirs.

Scales (``--scale``): ``full`` = the released SD 2.1-base / SDXL-base architectures at the issue's sizes (for a
GPU); ``reduced`` = the reduced-width models of the same layout (configs/tiny/, channels 32-128, 2-layer text
encoders) with the base size of each case's row in ``CASES`` (what a 2-core CPU can run). The releases'
FreeScale and DemoFusion code assumes SDXL's 1024-pixel base (FreeScale hard-codes it), so their reduced rows
keep the real sizes; ScaleCrafter's reduced rows keep its ratio (4x the base side) on a 256-pixel base.
"""
import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

RUNNER = REPO_ROOT / "tools" / "release_runner.py"
DEFAULT_ENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ldm-release-envs"
PROMPT = "a professional photograph of an astronaut riding a horse"

# the releases: where they are published, and the lines of their requirements.txt this comparison changes
RELEASES = {
    "scalecrafter": {"repo": "YingqingHe/ScaleCrafter",
                     # diffusers 0.20.2 imports huggingface_hub.cached_download, removed in huggingface_hub 0.26
                     # (FreeScale pins the same diffusers with huggingface_hub==0.25.2); torch 2.0 needs numpy < 2
                     "add": ["huggingface_hub==0.25.2", "numpy<2"]},
    "freescale": {"repo": "ali-vilab/FreeScale", "add": ["numpy<2"]},
    "demofusion": {"repo": "PRIS-CV/DemoFusion", "add": ["huggingface_hub<0.26", "numpy<2"]},
}
# left out of every release's requirements: xformers (a CUDA-only build; none of the releases' scripts turns it
# on, diffusers uses torch's scaled_dot_product_attention without it) and the gradio demo UIs' packages
LEFT_OUT = {"xformers": "CUDA-only build, not enabled by the releases' scripts",
            "gradio": "demo UI only", "gradio_imageslider": "demo UI only"}
# pins a --torch project environment takes from this environment instead (its torch build and the numeric stack)
FROM_PROJECT = ("torch", "torchvision", "numpy", "scipy")

# case -> what both sides run; per scale: (model spec, base latent side, image side)
CASES = {
    "scalecrafter-sd21-2048": {
        "release": "scalecrafter", "runner_case": "scalecrafter-sd", "release_preset": "configs/sd2.1_2048x2048.yaml",
        "ours": ["--method", "scalecrafter", "--scalecrafter_config", "configs/scalecrafter/sd2.1_2048x2048.yaml",
                 "--sampler", "ddim", "--ddim_eta", "1.0"],
        "full": ("sd2", 64, 2048), "reduced": ("tiny-sd2", 32, 1024)},
    "scalecrafter-sdxl-4096": {
        "release": "scalecrafter", "runner_case": "scalecrafter-sdxl", "release_preset": "configs/sdxl_4096x4096.yaml",
        "ours": ["--method", "scalecrafter", "--scalecrafter_config", "configs/scalecrafter/sdxl_4096x4096.yaml",
                 "--sampler", "ddim", "--ddim_eta", "1.0"],
        "full": ("sdxl", 128, 4096), "reduced": ("tiny-sdxl", 32, 1024)},
    "freescale-sdxl-2048": {
        "release": "freescale", "runner_case": "freescale",
        "ours": ["--method", "freescale", "--freescale_config", "configs/freescale/sdxl_2048x2048.yaml",
                 "--sampler", "euler"],
        "stages": (1, 2), "full": ("sdxl", 128, 2048), "reduced": ("tiny-sdxl", 128, 2048)},
    "freescale-sdxl-4096": {
        "release": "freescale", "runner_case": "freescale",
        "ours": ["--method", "freescale", "--freescale_config", "configs/freescale/sdxl_4096x4096.yaml",
                 "--sampler", "euler"],
        "stages": (1, 2, 4), "full": ("sdxl", 128, 4096), "reduced": ("tiny-sdxl", 128, 4096)},
    "demofusion-sdxl-2048": {
        "release": "demofusion", "runner_case": "demofusion",
        "ours": ["--method", "demofusion", "--df_stride", "64", "--df_view_batch", "16", "--sampler", "euler"],
        "release_args": ["--stride", "64", "--view_batch", "16", "--multi_decoder"],
        "full": ("sdxl", 128, 2048), "reduced": ("tiny-sdxl", 128, 2048)},
}
DEFAULT_CASES = {"full": list(CASES),
                 "reduced": ["scalecrafter-sd21-2048", "scalecrafter-sdxl-4096", "freescale-sdxl-2048",
                             "demofusion-sdxl-2048"]}


# ------------------------------------------------------------------------------------------------------------
# the releases' environments

def requirement_name(line):
    """The distribution name of a requirements line (lower case, '-' for '_'), or None for a blank/comment."""
    line = line.split("#", 1)[0].strip()
    if not line:
        return None
    for i, ch in enumerate(line):
        if ch in "<>=!~;[ ":
            line = line[:i]
            break
    return line.strip().lower().replace("_", "-")


def release_pins(requirements_text, release, torch_mode="pinned"):
    """(pins to install, [(line, why left out)]) from a release's requirements.txt: LEFT_OUT dropped, the
    release's RELEASES[...]["add"] lines added (replacing a line of the same name), and with ``torch_mode ==
    "project"`` the FROM_PROJECT packages left to this environment."""
    left_out = {k.replace("_", "-"): v for k, v in LEFT_OUT.items()}
    if torch_mode == "project":
        left_out.update({k: "taken from this environment (--torch project)" for k in FROM_PROJECT})
    added = {requirement_name(a): a for a in RELEASES[release]["add"]}
    pins, dropped = [], []
    for line in requirements_text.splitlines():
        name = requirement_name(line)
        if name is None:
            continue
        line = line.split("#", 1)[0].strip()
        if name in left_out:
            dropped.append((line, left_out[name]))
        elif name in added:
            dropped.append((line, f"replaced by {added[name]}"))
        else:
            pins.append(line)
    pins += [a for n, a in added.items() if n not in left_out]
    return pins, dropped


def env_key(pins, torch_mode):
    return hashlib.sha256(json.dumps([sorted(pins), torch_mode]).encode()).hexdigest()[:12]


def pip_install_command(python, pins, wheels=None, constraints=None):
    cmd = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    if wheels:
        cmd += ["--no-index", "--find-links", str(wheels)]
    if constraints:
        cmd += ["-c", str(constraints)]
    return cmd + list(pins)


def make_env(root, pins, torch_mode="pinned", wheels=None, log=print):
    """The python of a virtual environment with ``pins`` under ``root`` (made once per set of pins; a folder
    without its ``ready`` mark is made again). ``torch_mode == "project"``: the environment sees this one's
    packages (--system-site-packages) and keeps its torch."""
    import shutil
    import torch
    env = Path(root) / f"env-{env_key(pins, torch_mode)}"
    python = env / "bin" / "python"
    if (env / "ready").is_file():
        return python
    if env.exists():
        shutil.rmtree(env)
    env.parent.mkdir(parents=True, exist_ok=True)
    venv = [sys.executable, "-m", "venv", str(env)] + (["--system-site-packages"] if torch_mode == "project" else [])
    subprocess.run(venv, check=True)
    constraints = None
    if torch_mode == "project":
        constraints = env / "constraints.txt"
        constraints.write_text(f"torch=={torch.__version__.split('+')[0]}\n")  # its local label (+cu130) is not on the index
    cmd = pip_install_command(python, pins, wheels, constraints)
    log("$ " + shlex.join(cmd))
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    (env / "pins.txt").write_text("\n".join(pins) + "\n")
    (env / "ready").write_text(f"installed in {time.perf_counter() - t:.0f} s\n")
    return python


# what an exported checkout keeps: code, presets, settings files and transforms (no pictures, notebooks or PDFs,
# so that checkouts and wheels fit what a call to an offline GPU machine can carry)
CHECKOUT_SUFFIXES = (".py", ".txt", ".yaml", ".yml", ".mat", ".json", ".md")


def release_checkout(path, root):
    """(checkout folder, commit or None): ``path`` itself when it holds files, else the HEAD of a bare git
    directory exported once into ``root`` (CHECKOUT_SUFFIXES only)."""
    path = Path(path)
    if (path / "requirements.txt").is_file():
        commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True).stdout.strip() or None
        return path, commit
    commit = subprocess.run(["git", "--git-dir", str(path), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    dest = Path(root) / f"checkout-{path.resolve().parent.name if path.name == 'repo' else path.name}-{commit}"
    if not (dest / "requirements.txt").is_file():
        # file by file: a shallow snapshot may lack some blobs (pictures), which the pipelines do not need
        listing = subprocess.run(["git", "--git-dir", str(path), "ls-tree", "-r", "-z", "HEAD"], capture_output=True,
                                 check=True).stdout.decode()
        for entry in filter(None, listing.split("\0")):
            meta, name = entry.split("\t", 1)
            mode, kind, blob = meta.split()
            if kind != "blob" or Path(name).suffix.lower() not in CHECKOUT_SUFFIXES:
                continue
            data = subprocess.run(["git", "--git-dir", str(path), "cat-file", "blob", blob], capture_output=True)
            if data.returncode == 0:
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                (dest / name).write_bytes(data.stdout)
    return dest, commit


# ------------------------------------------------------------------------------------------------------------
# the two sides of one case

def case_geometry(case, scale):
    spec, base, side = CASES[case][scale]
    return {"spec": spec, "base": base, "side": side, "base_px": base * 8}


def runner_command(python, case, scale, checkout, model_dir, steps, seed, device, threads, prompt=PROMPT,
                   repeats=1):
    """The command that runs the release's side of ``case`` (tools/release_runner.py in the release's env)."""
    c = CASES[case]
    g = case_geometry(case, scale)
    cmd = [str(python), str(RUNNER), "--release", str(checkout), "--case", c["runner_case"], "--model",
           str(model_dir), "--height", str(g["side"]), "--width", str(g["side"]), "--steps", str(steps),
           "--seed", str(seed), "--prompt", prompt, "--device", device, "--threads", str(threads),
           "--dtype", "float16" if device == "cuda" else "float32", "--repeats", str(repeats)]
    if "release_preset" in c:
        cmd += ["--preset", c["release_preset"]]
    if "stages" in c:
        cmd += ["--stages"] + [str(g["base_px"] * k) for k in c["stages"] for _ in range(2)]
    return cmd + list(c.get("release_args", []))


def ours_argv(case, scale, model, steps, seed, device, outdir, prompt=PROMPT):
    """scripts/txt2img.py's arguments for this repository's side of ``case``."""
    g = case_geometry(case, scale)
    argv = ["--config", str(model["config"]), "--ckpt", str(model["ckpt"]), "--prompt", prompt,
            "--negative_prompt", "", "--H", str(g["side"]), "--W", str(g["side"]), "--steps", str(steps),
            "--seed", str(seed), "--scale", "7.5", "--n_samples", "1", "--skip_grid", "--device", device,
            "--outdir", str(outdir)]
    if device == "cuda":
        argv += ["--precision", "half"]  # float16 weights, as the releases load them (torch_dtype=float16)
    return argv + list(CASES[case]["ours"])


def ours_child(argv):
    """Runs in a child process of this environment: one txt2img run, measured like release_runner.py; RESULT."""
    import torch
    from tools.release_runner import UNetMeter, peak_rss_gib
    opts = json.loads(argv[0])
    torch.set_num_threads(int(opts["threads"]))
    from ldm.checkpoint import load_model_from_config
    from ldm.pipelines import txt2img
    cuda = opts["device"] == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    state = {}

    def loader(*a, **k):
        model = load_model_from_config(*a, **k)
        if "meter" not in state:  # the base model (SD+SR's upscaler would be a second one)
            state["meter"] = UNetMeter(model.model.diffusion_model, sync)
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            sync()
            state["t0"], state["c0"] = time.perf_counter(), time.process_time()
        return model

    opt = txt2img.build_parser().parse_args(opts["argv"])
    txt2img.run(opt, loader=loader)
    sync()
    m = state["meter"]
    res = {"image_s": time.perf_counter() - state["t0"], "image_cpu_s": time.process_time() - state["c0"],
           "unet_s": m.seconds, "unet_calls": m.calls, "unet_elements": m.elements, "peak_rss_gib": peak_rss_gib(),
           "torch": torch.__version__, "side": "ours", "runs": 1}
    if cuda:
        res.update(peak_allocated_gib=torch.cuda.max_memory_allocated() / 2 ** 30,
                   peak_reserved_gib=torch.cuda.max_memory_reserved() / 2 ** 30)
    print("RESULT " + json.dumps(res), flush=True)


def parse_result(stdout):
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return None


def run_side(cmd, env, timeout):
    t = time.perf_counter()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO_ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    res = parse_result(out.stdout)
    if res is None:
        tail = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:300], "stderr": out.stderr[-4000:]}
    res["wall_s"] = time.perf_counter() - t
    return res


# ------------------------------------------------------------------------------------------------------------
# the table

def ratio(a, b):
    return f"{a / b:.2f}×" if a is not None and b else "–"


def peak_of(res, device):
    key = "peak_allocated_gib" if device == "cuda" else "peak_rss_gib"
    return res.get(key)


def render_table(rows, device, machine, command, scale, steps, torch_mode="pinned"):
    """Markdown: one row per case, ours / theirs for time per image, UNet time and peak memory."""
    mem = "peak allocated GiB (reserved)" if device == "cuda" else "peak RSS GiB"
    cpu = device == "cpu"  # the CPU time of each side too: a shared machine disturbs it far less than the wall time
    cpu_head = " ours image CPU s | theirs image CPU s | ratio |" if cpu else ""
    releases_torch = "the releases on their pinned torch" if torch_mode == "pinned" else \
        "the releases on this environment's torch"
    lines = [f"### Against the authors' pipelines: {scale} scale, {device}, {releases_torch}", "",
             f"Machine: {machine}. Command: `{command}`. Random weights, the same tensors on both sides; "
             f"{steps} steps, guidance 7.5, seed 42, one image, FreeU off on both sides. *image s*: the pipeline "
             "call (text encoding, sampling, decoding; not the loading); *UNet s*: the time inside the UNet's "
             "forward calls; *image CPU s* (CPU only): the process's CPU time during the call; *UNet elements*: batch elements through the UNet (a guided step is 2); ratios are "
             "ours / theirs (≤ 1.00× = ours is faster / smaller).", "",
             f"| case | model (base → image) | release | ours image s | theirs image s | ratio |{cpu_head} ours UNet s | "
             f"theirs UNet s | ratio | UNet elements ours / theirs | ours {mem} | theirs {mem} | ratio |",
             "|---|---|---|---|---|---|" + "---|" * (3 if cpu else 0) + "---|---|---|---|---|---|---|"]
    for r in rows:
        g = r["geometry"]
        model = f"{g['spec']} ({g['base_px']}² → {g['side']}²)"
        rel = r.get("release_label", r["release"])
        o, t = r["ours"], r["theirs"]
        if "error" in o or "error" in t:
            why = "; ".join(f"{side}: {x['error']}" for side, x in (("ours", o), ("theirs", t)) if "error" in x)
            lines.append(f"| {r['case']} | {model} | {rel} | failed: {why} |" + "  |" * (12 if cpu else 9))
            continue

        def memory(x):
            if device == "cuda":
                return f"{x['peak_allocated_gib']:.2f} ({x['peak_reserved_gib']:.2f})"
            return f"{x['peak_rss_gib']:.2f}"
        lines.append(
            f"| {r['case']} | {model} | {rel} | {o['image_s']:.2f} | {t['image_s']:.2f} | "
            f"{ratio(o['image_s'], t['image_s'])} |"
            + (f" {o['image_cpu_s']:.2f} | {t['image_cpu_s']:.2f} | {ratio(o['image_cpu_s'], t['image_cpu_s'])} |"
               if cpu else "")
            + f" {o['unet_s']:.2f} | {t['unet_s']:.2f} | "
            f"{ratio(o['unet_s'], t['unet_s'])} | {o['unet_elements']} / {t['unet_elements']} | {memory(o)} | "
            f"{memory(t)} | {ratio(peak_of(o, device), peak_of(t, device))} |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------
# commands

def parse_releases(items):
    out = {}
    for item in items or []:
        name, sep, path = item.partition("=")
        if not sep or name not in RELEASES:
            raise SystemExit(f"error: --release {item!r}: expected NAME=PATH with NAME one of {', '.join(RELEASES)}")
        out[name] = Path(path)
    return out


def run_command(args):
    import torch
    from ldm.reports import machine_description
    from tools.release_models import write_model
    releases = parse_releases(args.release)
    cases = args.cases or DEFAULT_CASES[args.scale]
    missing = sorted({CASES[c]["release"] for c in cases} - set(releases))
    if missing:
        raise SystemExit(f"error: no checkout for {', '.join(missing)}: add --release "
                         + " ".join(f"{m}=PATH" for m in missing) + f" (the repositories: "
                         + ", ".join(RELEASES[m]["repo"] for m in missing) + ")")
    env_root = Path(args.env)
    work = Path(args.work or tempfile.mkdtemp(prefix="compare-releases-"))
    child_env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), PYTHONPATH=str(REPO_ROOT))
    rows, models, pythons = [], {}, {}
    for case in cases:
        c = CASES[case]
        g = case_geometry(case, args.scale)
        checkout, commit = release_checkout(releases[c["release"]], env_root)
        key = (g["spec"], g["base"])
        if key not in models:
            print(f"== model {g['spec']} base {g['base_px']} px", flush=True)
            models[key] = write_model(g["spec"], work / f"{g['spec']}-{g['base']}", base=g["base"], seed=args.seed,
                                      dtype=torch.float16 if args.device == "cuda" else torch.float32)
        model = models[key]
        if c["release"] not in pythons:
            pins, dropped = release_pins((checkout / "requirements.txt").read_text(), c["release"], args.torch)
            for line, why in dropped:
                print(f"   {c['release']}: left out {line!r}: {why}", flush=True)
            pythons[c["release"]] = make_env(env_root, pins, args.torch, args.wheels)
        theirs_cmd = runner_command(pythons[c["release"]], case, args.scale, checkout, model["diffusers"],
                                    args.steps, args.seed, args.device, args.threads)
        ours_cmd = [sys.executable, __file__, "_ours", json.dumps({
            "threads": args.threads, "device": args.device,
            "argv": ours_argv(case, args.scale, model, args.steps, args.seed, args.device, work / f"out-{case}")})]
        results = {}
        for side, cmd in (("ours", ours_cmd), ("theirs", theirs_cmd)):
            print(f"== {case} {side}: {shlex.join(cmd)[:400]}", flush=True)
            results[side] = run_side(cmd, child_env, args.timeout)
            shown = {k: v for k, v in results[side].items() if k != "stderr"}
            print(f"   {json.dumps(shown)}", flush=True)
            if "stderr" in results[side]:
                print(results[side]["stderr"], flush=True)
        rel_versions = results["theirs"].get("diffusers")
        label = f"{RELEASES[c['release']]['repo']}@{commit}" if commit else RELEASES[c["release"]]["repo"]
        if rel_versions:
            label += (f" (diffusers {results['theirs']['diffusers']}, transformers "
                      f"{results['theirs']['transformers']}, torch {results['theirs']['torch']})")
        rows.append({"case": case, "release": c["release"], "release_label": label, "geometry": g,
                     "ours": results["ours"], "theirs": results["theirs"]})
    machine = machine_description(args.device)
    if args.device == "cpu":
        machine += f", {args.threads} thread(s) per side; ours: torch {torch.__version__}"
    command = "python tools/compare_releases.py " + " ".join(
        shlex.quote(a) for a in (args.argv_shown or []))
    table = render_table(rows, args.device, machine, command, args.scale, args.steps, args.torch)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if args.write:
        from ldm.reports import replace_block
        replace_block(args.write, "bench", args.key or f"releases-{args.scale}-{args.device}", table,
                      heading="# Benchmarks\n")
    return rows


# torch's and triton's own dependencies: a --torch project environment has them with this environment's torch
TORCH_DEPENDENCIES = ("cmake", "lit", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "filelock", "fsspec",
                      "typing-extensions")


def offline_requirements(freeze_text, installed=None):
    """The ``pip freeze`` lines of a release environment that an offline ``--torch project`` environment must bring
    along: all but the packages it takes from this environment (FROM_PROJECT, torch's dependencies, torch's CUDA
    wheels) and those ``installed`` ({name: version}) here at the same version."""
    installed = {k.lower().replace("_", "-"): v for k, v in (installed or {}).items()}
    out = []
    for line in freeze_text.splitlines():
        name = requirement_name(line)
        if name is None or "==" not in line or name in FROM_PROJECT + TORCH_DEPENDENCIES \
                or name.startswith(("nvidia-", "triton")):
            continue
        if installed.get(name) == line.split("==", 1)[1].strip():
            continue
        out.append(line.strip())
    return out


def installed_versions():
    from importlib.metadata import distributions
    return {d.metadata["Name"]: d.version for d in distributions() if d.metadata["Name"]}


def download_command(args):
    """Wheels for a machine without network (then ``run --torch project --wheels DEST`` there): the exact versions
    that each release's environment resolved here (``pip freeze``; made first when absent), built or downloaded
    with ``pip wheel --no-deps``; torch and its dependencies, numpy, scipy, the CUDA wheels and what this environment
    has at the same version are left to that machine (which has this repository's requirements installed)."""
    releases = parse_releases(args.release)
    for name, path in releases.items():
        checkout, _ = release_checkout(path, args.env)
        pins, _ = release_pins((checkout / "requirements.txt").read_text(), name, "pinned")
        python = make_env(args.env, pins, "pinned")
        freeze = subprocess.run([str(python), "-m", "pip", "freeze"], capture_output=True, text=True, check=True)
        reqs = offline_requirements(freeze.stdout, installed_versions())
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(args.dest)] + reqs
        print("$ " + shlex.join(cmd), flush=True)
        subprocess.run(cmd, check=True)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("run", "download"):
        q = sub.add_parser(name)
        q.add_argument("--release", nargs="+", default=[], metavar="NAME=PATH",
                       help="release checkouts (or bare git dirs): " + ", ".join(
                           f"{k} ({v['repo']})" for k, v in RELEASES.items()))
        q.add_argument("--env", default=str(DEFAULT_ENV), help="where the throwaway environments and exported "
                                                               "checkouts live (default: %(default)s)")
        q.add_argument("--torch", choices=["pinned", "project"], default="pinned",
                       help="pinned: the release's torch pin; project: this environment's torch, numpy and scipy "
                            "(a venv with --system-site-packages; for a GPU machine whose CUDA needs a newer torch)")
    r = sub.choices["run"]
    r.add_argument("--scale", choices=["full", "reduced"], default="reduced")
    r.add_argument("--cases", nargs="+", choices=list(CASES), default=None)
    r.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    r.add_argument("--steps", type=int, default=2)
    r.add_argument("--seed", type=int, default=42)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--timeout", type=int, default=1800, help="seconds per side and case")
    r.add_argument("--wheels", default=None, help="install the pins from this folder only (pip --no-index)")
    r.add_argument("--work", default=None, help="where the models and images go (default: a temporary folder)")
    r.add_argument("--json", default=None, help="also write the raw results here")
    r.add_argument("--write", default=None, help="update this markdown file")
    r.add_argument("--key", default=None, help="section key in the markdown file")
    sub.choices["download"].add_argument("--dest", required=True)
    return p


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_ours"]:
        return ours_child(argv[1:])
    args = build_parser().parse_args(argv)
    # the command as the docs show it: the checkouts' local paths replaced by NAME=CHECKOUT
    args.argv_shown = [f"{a.partition('=')[0]}=CHECKOUT" if a.partition("=")[0] in RELEASES and "=" in a else a
                       for a in argv]
    if args.cmd == "download":
        return download_command(args)
    return run_command(args)


if __name__ == "__main__":
    rc = main()
    sys.exit(rc if isinstance(rc, int) else 0)
