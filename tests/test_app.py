"""The web app's logic without a browser (``ldm/app/``; the browser test is tests/test_app_browser.py).

* choices come from the registries and the repository: a method or sampler registered at run time appears with
  its own options, the demo model's presets are exactly the preset files made for it;
* a form becomes the command line's arguments (expected lists written out here); bad input is a UsageError with
  the command line's text;
* the app's images and metadata are the command line's for the same arguments (scripts/txt2img.py and
  scripts/upscale.py write the oracles);
* a cancelled run stops within a step and leaves the cached model as loaded (the next run's image is the image
  of a fresh run); two sessions' jobs run, one after the other, each with its own images, and a session sees only
  its own jobs;
* the HTTP routes: the page has no reference to another host and a CSP that forbids one, bad input is a 400
  with the message, another session's job is a 404, a foreign Host header a 403, an image is the PNG with its
  metadata; the server binds 127.0.0.1 unless --listen.
"""
import argparse
import hashlib
import io
import json
import re
import threading
import time

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import REPO_ROOT, load_script
from ldm import methods
from ldm.app import choices, forms, jobs, server
from ldm.errors import UsageError
from ldm.methods.base import GuidanceMethod

DEMO = "checkpoints/demo/shapes32.ckpt"
SC64 = "configs/scalecrafter/demo_64x64.yaml"
SC128 = "configs/scalecrafter/demo_128x128.yaml"
FORM = {"model": DEMO, "prompt": "a red circle", "negative_prompt": "", "method": "scalecrafter", "preset": SC64,
        "H": "64", "W": "64", "sampler": "ddim", "steps": "4", "eta": "1.0", "scale": "3.0", "seed": "5",
        "batch": "2"}


@pytest.fixture(scope="module")
def catalog():
    return choices.Catalog()


@pytest.fixture
def runner(catalog):
    return jobs.Runner(catalog, device="cpu")


def wait(job, timeout=60):
    t0 = time.time()
    while not job.finished:
        assert time.time() - t0 < timeout, f"job still {job.state} ({job.stage}) after {timeout} s"
        time.sleep(0.02)
    return job


def pixels(data):
    return np.asarray(Image.open(io.BytesIO(data) if isinstance(data, bytes) else data).convert("RGB"))


def png_text(data):
    img = Image.open(io.BytesIO(data) if isinstance(data, bytes) else data)
    return {k: v for k, v in img.text.items()}


# -- choices ---------------------------------------------------------------------------------------------------

class FakeMethod(GuidanceMethod):
    name = "fake_app_method"
    label = "Fake"
    summary = "registered by the test"

    @classmethod
    def add_args(cls, parser):
        g = parser.add_argument_group("fake")
        g.add_argument("--fake_count", type=int, default=None, help="a count")
        g.add_argument("--fake_mode", choices=["a", "b"], default="a")
        g.add_argument("--fake_on", action="store_true")
        g.add_argument("--fake_sizes", type=int, nargs="+", default=None)


def test_choices_follow_the_registries(monkeypatch, catalog):
    static = catalog.static()
    assert [m["name"] for m in static["methods"]] == list(methods.names())
    assert static["img2img_methods"] == [n for n in methods.names() if methods.method_class(n).img2img]
    from ldm.samplers import SAMPLERS
    assert static["samplers"]["names"] == list(SAMPLERS)
    # a method and a sampler registered now appear, with the method's own options described
    monkeypatch.setitem(SAMPLERS, "fake_sampler", "ldm.samplers.ddim:DDIMSampler")
    methods.register(FakeMethod.name, FakeMethod)
    try:
        fresh = choices.Catalog().static()
    finally:
        methods.unregister(FakeMethod.name)
    assert "fake_sampler" in fresh["samplers"]["names"]
    fake = [m for m in fresh["methods"] if m["name"] == FakeMethod.name]
    assert len(fake) == 1 and fake[0]["label"] == "Fake" and fake[0]["preset_flag"] is None
    opts = {o["dest"]: (o["flag"], o["kind"], o["default"], o["choices"]) for o in fake[0]["options"]}
    assert opts == {"fake_count": ("--fake_count", "int", None, None), "fake_mode": ("--fake_mode", "choice", "a",
                    ["a", "b"]), "fake_on": ("--fake_on", "flag", False, None),
                    "fake_sizes": ("--fake_sizes", "list", None, None)}
    assert FakeMethod.name not in [m["name"] for m in choices.Catalog().static()["methods"]]


def test_demo_model_first_with_its_presets_and_sizes(catalog):
    assert catalog.models[0].id == DEMO
    assert catalog.models[0].config == (REPO_ROOT / "configs/demo/shapes32.yaml").resolve()
    desc = catalog.for_model(DEMO)
    # the preset files whose base_model is the demo model, read here with plain YAML
    for name in methods.names():
        cls = methods.method_class(name)
        expected = []
        if cls.preset_dir:
            for path in sorted((REPO_ROOT / "configs" / cls.preset_dir).glob("*.yaml")):
                data = yaml.safe_load(path.read_text())
                if data.get("base_model") == "demo":
                    expected.append((f"configs/{cls.preset_dir}/{path.name}", [data["height"], data["width"]]))
        assert [(p["path"], p["size"]) for p in desc["presets"][name]] == expected, name
    assert ("configs/scalecrafter/demo_64x64.yaml", [64, 64]) in [(p["path"], p["size"])
                                                                  for p in desc["presets"]["scalecrafter"]]
    sizes = [(s["H"], s["W"]) for s in desc["sizes"]]
    assert {(32, 32), (64, 64), (128, 128), (64, 128)} <= set(sizes)
    assert desc["presets"]["scalecrafter"][1]["suggested"] == {"steps": 25, "scale": 3.0, "eta": 1.0}


def test_checkpoints_are_paired_with_configs(tmp_path):
    (tmp_path / "configs" / "demo").mkdir(parents=True)
    (tmp_path / "configs" / "stable-diffusion").mkdir()
    cfg = (REPO_ROOT / "configs/demo/shapes32.yaml").read_text()
    (tmp_path / "configs/demo/shapes32.yaml").write_text(cfg)
    (tmp_path / "configs/stable-diffusion/v2-inference.yaml").write_text(cfg)
    ck = tmp_path / "checkpoints"
    (ck / "demo").mkdir(parents=True)
    for name in ("demo/shapes32.ckpt", "v2-1_512-ema-pruned.ckpt", "mine.safetensors", "orphan.ckpt"):
        (ck / name).write_bytes(b"x")
    (ck / "mine.yaml").write_text(cfg)
    models, notes = choices.find_models(tmp_path)
    got = [(m.ckpt.relative_to(tmp_path).as_posix(), m.config.relative_to(tmp_path).as_posix()) for m in models]
    assert got == [("checkpoints/demo/shapes32.ckpt", "configs/demo/shapes32.yaml"),
                   ("checkpoints/mine.safetensors", "checkpoints/mine.yaml"),
                   ("checkpoints/v2-1_512-ema-pruned.ckpt", "configs/stable-diffusion/v2-inference.yaml")]
    assert len(notes) == 1 and "orphan.ckpt" in notes[0] and "--model" in notes[0]


# -- forms -----------------------------------------------------------------------------------------------------

def test_form_to_arguments(catalog):
    model, argv = forms.txt2img_argv(FORM, catalog, "cpu")
    root = REPO_ROOT.resolve()
    assert model.id == DEMO
    assert argv == ["--config", str(root / "configs/demo/shapes32.yaml"), "--ckpt", str(root / DEMO),
                    "--device", "cpu", "--method", "scalecrafter", "--prompt", "a red circle", "--negative_prompt",
                    "", "--H", "64", "--W", "64", "--steps", "4", "--scale", "3.0", "--seed", "5", "--n_samples", "2",
                    "--sampler", "ddim", "--ddim_eta", "1.0", "--scalecrafter_config", str(root / SC64)]
    # own options: empty ones left out, a flag, a toggle switched off, a list, a choice
    form = dict(FORM, method="hidiffusion", preset="", options={"hidiff_raunet": False, "hidiff_window_attn": True,
                                                                  "hidiff_T1_ratio": "0.3", "hidiff_T2_ratio": "",
                                                                  "hidiff_aggressive": "off"})
    argv = forms.txt2img_argv(form, catalog, "cpu")[1]
    assert argv[argv.index("hidiffusion") + 1:][-5:] == ["--no-hidiff_raunet", "--hidiff_T1_ratio", "0.3",
                                                           "--hidiff_aggressive", "off"]
    argv = forms.txt2img_argv(dict(FORM, method="demofusion", preset="",
                                   options={"df_cosine_scales": "3, 2 1"}), catalog, "cpu")[1]
    assert argv[-4:] == ["--df_cosine_scales", "3", "2", "1"]
    opt = forms.parse_txt2img(dict(FORM, method="freescale", preset="", options={"fast_mode": True}), catalog)[2]
    assert opt.fast_mode is True and opt.method == "freescale"


@pytest.mark.parametrize("change, words", [
    ({"seed": "-1"}, ["--seed", "-1"]),
    ({"steps": "many"}, ["--steps", "many"]),
    ({"model": "../../etc/passwd"}, ["not one of the models"]),
    ({"preset": "/etc/passwd"}, ["--scalecrafter_config", "not one of"]),
    ({"preset": "configs/freescale/demo_64x64.yaml"}, ["not one of the ScaleCrafter presets"]),
    ({"method": "nonsense"}, ["method 'nonsense'"]),
    ({"options": {"md_stride": "4"}}, ["md_stride", "not an option of ScaleCrafter"]),
    ({"sampler": "nonsense"}, ["sampler 'nonsense'"]),
    ({"batch": "17"}, ["at most 16"]),
])
def test_bad_form_is_a_usage_error(catalog, change, words):
    with pytest.raises(UsageError) as err:
        forms.parse_txt2img(dict(FORM, **change), catalog)
    for w in words:
        assert w in str(err.value)


def test_bad_input_found_before_running_is_refused_by_submit(runner):
    with pytest.raises(UsageError, match="--steps 0"):
        runner.submit_txt2img("s" * 16, dict(FORM, steps="0"))
    with pytest.raises(UsageError, match="--H 0"):
        runner.submit_txt2img("s" * 16, dict(FORM, H="0"))
    assert runner.jobs_of("s" * 16) == []


# -- runs: the command line's images, cancellation, sessions ---------------------------------------------------

def cli_images(tmp_path, argv, name="cli"):
    from ldm.pipelines import txt2img
    out = tmp_path / name
    txt2img.run(txt2img.build_parser().parse_args(argv + ["--outdir", str(out), "--skip_grid"]))
    return sorted((out / "samples").glob("?????.png"))


def test_images_and_metadata_are_the_command_lines(runner, tmp_path):
    job = wait(runner.submit_txt2img("tab-one-session", FORM))
    assert job.state == "done", job.error
    files = cli_images(tmp_path, forms.txt2img_argv(FORM, runner.catalog, "cpu")[1])
    assert len(job.results) == len(files) == 2
    for result, f in zip(job.results, files):
        assert np.array_equal(pixels(result.png), pixels(f))
        assert png_text(result.png) == png_text(f)
    meta = json.loads(png_text(job.results[0].png)["parameters"])
    assert (meta["method"], meta["H"], meta["W"], meta["steps"], meta["seed"]) == ("scalecrafter", 64, 64, 4, 5)
    assert job.stage_names == ["ScaleCrafter: 64×64"] and job.stages_done == ["ScaleCrafter: 64×64"]


def test_cascade_progress_names_its_stages(runner):
    form = dict(FORM, method="freescale", preset="configs/freescale/demo_64x64.yaml", batch="1", save_stages=True)
    seen = []
    job = runner.submit_txt2img("tab-one-session", form)
    while not job.finished:
        seen.append((job.progress, job.stage))
        time.sleep(0.005)
    assert job.state == "done", job.error
    assert job.stage_names == ["stage 1/2: 32×32", "stage 2/2: 64×64"]
    assert job.stages_done == job.stage_names
    progress = [p for p, _ in seen]
    assert progress == sorted(progress)
    assert len(job.results[0].stages) == 1 and pixels(job.results[0].stages[0]).shape == (32, 32, 3)


def test_progress_of_a_cascade_pattern():
    job = jobs.Job("s" * 16, "txt2img", None, [], "t", ["stage 1/2", "stage 2/2"])
    p = jobs.Progress(job, batches=1, steps=5)
    values = []
    for i in [0, 1, 2, 3, 4, 1, 2, 3, 4]:  # stage 2 restarts at step 1
        p(i)
        values.append(job.progress)
        if i == 2 and len(values) == 3:
            assert job.stage.startswith("stage 1/2") and job.stages_done == []
    assert values[4] == pytest.approx(0.5) and values[-1] == pytest.approx(1.0)
    assert values == sorted(values)
    assert job.stages_done == ["stage 1/2", "stage 2/2"] and job.stage == "decoding"
    job.cancel_event.set()
    with pytest.raises(jobs.Cancelled):
        p(0)


def test_cancel_stops_within_a_step_and_leaves_the_model_as_loaded(runner):
    session = "tab-one-session"
    form = dict(FORM, batch="1")
    before = wait(runner.submit_txt2img(session, form))
    assert before.state == "done", before.error
    long = runner.submit_txt2img(session, dict(FORM, batch="1", steps="999"))
    while long.progress == 0 and not long.finished:  # sampling, re-dilated convs installed
        time.sleep(0.01)
    t0 = time.time()
    runner.cancel(session, long.id)
    wait(long, timeout=30)
    assert long.state == "cancelled" and long.results == [] and long.error is None
    assert time.time() - t0 < 5
    assert long.progress < 0.5
    after = wait(runner.submit_txt2img(session, form))
    assert after.state == "done", after.error
    assert np.array_equal(pixels(after.results[0].png), pixels(before.results[0].png))
    assert runner.cache.loads == 1


def test_cancel_while_queued(runner):
    runner.run_lock.acquire()  # another run holds the device
    try:
        job = runner.submit_txt2img("tab-one-session", FORM)
        time.sleep(0.2)
        assert job.state == "queued" and "waiting" in job.stage
        runner.cancel("tab-one-session", job.id)
        wait(job, timeout=5)
        assert job.state == "cancelled"
    finally:
        runner.run_lock.release()


def test_sessions_are_isolated(runner):
    a, b = "tab-a-session-0001", "tab-b-session-0002"
    job_a = runner.submit_txt2img(a, dict(FORM, seed="11", batch="1"))
    job_b = runner.submit_txt2img(b, dict(FORM, seed="12", batch="1", method="freescale",
                                          preset="configs/freescale/demo_64x64.yaml"))
    wait(job_a), wait(job_b)
    assert job_a.state == job_b.state == "done", (job_a.error, job_b.error)
    assert [j.id for j in runner.jobs_of(a)] == [job_a.id] and [j.id for j in runner.jobs_of(b)] == [job_b.id]
    with pytest.raises(KeyError):
        runner.job(b, job_a.id)
    with pytest.raises(KeyError):
        runner.cancel(b, job_a.id)
    with pytest.raises(UsageError, match="no longer here"):
        runner.submit_img2img(b, {"source": job_a.id, "index": 0, "method": "scalecrafter", "preset": SC128})
    # each run's images are what it gives alone
    alone_a = wait(runner.submit_txt2img(a, dict(FORM, seed="11", batch="1")))
    alone_b = wait(runner.submit_txt2img(b, dict(FORM, seed="12", batch="1", method="freescale",
                                                 preset="configs/freescale/demo_64x64.yaml")))
    assert np.array_equal(pixels(job_a.results[0].png), pixels(alone_a.results[0].png))
    assert np.array_equal(pixels(job_b.results[0].png), pixels(alone_b.results[0].png))
    assert job_b.results[0].meta["parameters"]["method"] == "freescale"


def test_use_this_image_upscales_as_the_command_line(runner, tmp_path):
    session = "tab-one-session"
    src = wait(runner.submit_txt2img(session, dict(FORM, batch="1")))
    form = {"source": src.id, "index": 0, "prompt": "a red circle", "method": "scalecrafter", "preset": SC128,
            "steps": "4", "scale": "3.0", "seed": "9", "strength": "0.6"}
    job = wait(runner.submit_img2img(session, form))
    assert job.state == "done", job.error
    (res,) = job.results
    assert res.size == (128, 128)
    params = json.loads(png_text(res.png)["parameters"])
    assert params["mode"] == "img2img" and params["method"] == "scalecrafter"
    assert params["image_sha256"] == hashlib.sha256(src.results[0].png).hexdigest()
    # the command line on the same file
    image = tmp_path / "src.png"
    image.write_bytes(src.results[0].png)
    argv = forms.img2img_argv(form, runner.catalog, src.model, image, "cpu")
    up = load_script("upscale")
    assert up.main(argv + ["--outdir", str(tmp_path / "up")]) == 0
    (f,) = sorted((tmp_path / "up").glob("*.png"))
    assert np.array_equal(pixels(res.png), pixels(f))
    cli = json.loads(png_text(f)["parameters"])
    assert {k: v for k, v in cli.items() if k != "image"} == {k: v for k, v in params.items() if k != "image"}


def test_errors_during_a_run_are_messages(catalog):
    def broken(*args, **kwargs):
        raise RuntimeError("the disk is on fire")
    log = io.StringIO()
    runner = jobs.Runner(catalog, device="cpu", cache=jobs.ModelCache(load_fn=broken), log=log)
    job = wait(runner.submit_txt2img("tab-one-session", FORM))
    assert job.state == "error"
    assert job.error.startswith("internal error (RuntimeError: the disk is on fire)")
    assert "Traceback" not in job.error and "Traceback" in log.getvalue()

    def refused(*args, **kwargs):
        raise UsageError("--ckpt x: not a checkpoint")
    runner = jobs.Runner(catalog, device="cpu", cache=jobs.ModelCache(load_fn=refused))
    job = wait(runner.submit_txt2img("tab-one-session", FORM))
    assert (job.state, job.error) == ("error", "--ckpt x: not a checkpoint")


def test_model_cache_is_keyed_and_locked(tmp_path):
    calls = []

    def load(config, ckpt, **kw):
        calls.append((config, ckpt))
        time.sleep(0.1)
        return object()
    a, b = tmp_path / "a.ckpt", tmp_path / "b.ckpt"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    cfg = REPO_ROOT / "configs/demo/shapes32.yaml"
    cache = jobs.ModelCache(capacity=1, load_fn=load)
    got = []
    threads = [threading.Thread(target=lambda: got.append(cache.load({}, a, config_name=str(cfg))))
               for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len({id(m) for m in got}) == 1  # four tabs, one load
    cache.load({}, a, config_name=str(cfg), device="cpu")       # another device: another model
    cache.load({}, b, config_name=str(cfg))
    assert len(calls) == 3 and len(cache) == 1                   # capacity 1: the oldest dropped


# -- HTTP --------------------------------------------------------------------------------------------------------

@pytest.fixture
def client(runner):
    app = server.create_app(runner, allowed_hosts={"localhost"})
    return app.test_client()


def test_page_loads_nothing_from_other_hosts(client):
    page = client.get("/")
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["Content-Security-Policy"]
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert sorted(assets) == ["/static/app.css", "/static/app.js", "data:,"]
    for path in ("/", "/static/app.js", "/static/app.css"):
        text = client.get(path).get_data(as_text=True)
        assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
        assert "@import" not in text and "url(" not in text


def test_api(client, runner):
    h = {"X-Session": "tab-one-session"}
    assert client.get("/api/jobs").status_code == 400  # no session
    assert client.get("/", headers={"Host": "evil.example:7860"}).status_code == 403
    r = client.post("/api/generate", json=dict(FORM, seed="-1"), headers=h)
    assert r.status_code == 400 and "--seed" in r.get_json()["error"]
    r = client.post("/api/generate", json=FORM, headers=h)
    job = r.get_json()
    assert r.status_code == 200 and job["state"] in ("queued", "loading", "running")
    wait(runner.job("tab-one-session", job["id"]))
    job = client.get(f"/api/jobs/{job['id']}", headers=h).get_json()
    assert job["state"] == "done" and len(job["results"]) == 2
    assert job["results"][0]["metadata"]["prompt"] == "a red circle"
    assert client.get(f"/api/jobs/{job['id']}", headers={"X-Session": "tab-two-session"}).status_code == 404
    assert client.post(f"/api/jobs/{job['id']}/cancel", headers={"X-Session": "tab-two-session"}).status_code == 404
    img = client.get(f"/api/jobs/{job['id']}/images/1.png?download=1")
    assert img.status_code == 200 and img.mimetype == "image/png"
    assert img.headers["Content-Disposition"].startswith("attachment")
    assert img.data == runner.job_by_id(job["id"]).results[1].png
    assert json.loads(png_text(img.data)["parameters"])["position_in_batch"] == 1
    assert client.get(f"/api/jobs/{job['id']}/images/2.png").status_code == 404
    choices_ = client.get("/api/choices").get_json()
    assert [m["name"] for m in choices_["methods"]] == list(methods.names())
    assert client.get("/api/models/nonsense").status_code == 400


def test_binds_loopback_unless_listen():
    opt = server.build_parser().parse_args(["--port", "0"])
    srv, runner = server.make_server(opt)
    try:
        assert srv.server_address[0] == "127.0.0.1"
    finally:
        srv.server_close()
    assert not any(line.startswith("warning") for line in server.startup_messages(opt, srv, runner))
    opt = server.build_parser().parse_args(["--port", "0", "--listen"])
    assert server.host_of(opt) == "0.0.0.0"
    (warning,) = [line for line in server.startup_messages(opt, srv, runner) if line.startswith("warning")]
    assert "--listen" in warning and "no login" in warning
    with pytest.raises(UsageError, match="--model x: give CONFIG=CKPT"):
        server.make_server(server.build_parser().parse_args(["--port", "0", "--model", "x"]))
    assert isinstance(server.build_parser(), argparse.ArgumentParser)


def test_script_is_a_thin_cli():
    import subprocess
    import sys
    out = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/app.py"), "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "--listen" in out.stdout and "127.0.0.1" in out.stdout
    bad = subprocess.run([sys.executable, str(REPO_ROOT / "scripts/app.py"), "--port", "0", "--checkpoints",
                          "/nonexistent"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip() == "error: --checkpoints /nonexistent: no such folder"


def test_the_form_eta_goes_to_the_samplers_own_option(catalog):
    """DDIM's noise is --ddim_eta, euler_a's --eta; a sampler that draws no noise gets none (the pipeline would refuse
    an eta it does not use)."""
    def tail(sampler):
        _, argv = forms.txt2img_argv(dict(FORM, sampler=sampler), catalog, "cpu")
        i = argv.index("--sampler")
        return argv[i:i + 4]
    assert tail("ddim") == ["--sampler", "ddim", "--ddim_eta", "1.0"]
    assert tail("euler_a") == ["--sampler", "euler_a", "--eta", "1.0"]
    assert tail("euler")[:2] == ["--sampler", "euler"] and "--eta" not in tail("euler")
    assert "--ddim_eta" not in tail("euler")
