"""The web app end to end in a real browser: headless Chromium (Debian's ``chromium`` and ``chromium-driver``)
driven by Selenium, against ``scripts/app.py``'s server on the demo model (no weights needed).

In order, on one page: it loads (every request to the app's own origin, no console error); ScaleCrafter at 64²
from its preset gives two images whose PNG, downloaded by the page, is the command line's image with its
metadata; a bad seed is a message on the page, no traceback; a long run is cancelled and the server goes on;
switching to FreeScale swaps the preset and option fields, and its run names both cascade stages; "use this
image" upscales a result to 128² with img2img.

A missing or broken browser FAILS this test with the reason (install: ``apt-get install -y chromium
chromium-driver``, as ``.ci/run`` does). ``APP_SCREENSHOT=docs/images/app.png`` also saves the page at the end
(the README's screenshot).
"""
import base64
import io
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT

CHROMIUM = os.environ.get("APP_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("APP_TEST_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get install -y chromium chromium-driver (Debian), pip install selenium (requirements.txt)"
STEPS = "10"


@pytest.fixture(scope="module")
def app():
    from ldm.app import server
    opt = server.build_parser().parse_args(["--port", "0", "--device", "cpu"])
    srv, runner = server.make_server(opt)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_port}", runner
    srv.shutdown()
    srv.server_close()


@pytest.fixture(scope="module")
def browser():
    """(driver, None), or (None, why the browser is not there): each test then FAILS with that reason (a
    fixture error would read as an error of the test setup)."""
    driver, reason, profile = None, None, tempfile.mkdtemp(prefix="app-test-chromium-")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not Path(p).is_file()]
    if missing:
        reason = f"{', '.join(missing)} not found: the browser test needs Chromium and its driver ({INSTALL})"
    else:
        try:
            from selenium import webdriver
            from selenium.webdriver.chrome.service import Service
        except ImportError as err:
            reason = f"selenium is not installed ({err}; {INSTALL})"
    if reason is None:
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                    "--window-size=1400,1000", "--force-device-scale-factor=1", f"--user-data-dir={profile}",
                    "--no-first-run", "--disable-background-networking", "--disable-component-update",
                    "--disable-sync", "--disable-default-apps", "--disable-extensions", "--lang=en-US"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        try:
            driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
            driver.set_script_timeout(30)
        except Exception as err:  # noqa: BLE001 - the reason is the message
            reason = f"Chromium did not start through {CHROMEDRIVER}: {type(err).__name__}: {err}"
    yield driver, reason
    if driver is not None:
        driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture(scope="module")
def loaded():
    return {}


@pytest.fixture
def open_page(app, browser, loaded):
    """``open_page()`` in a test: the app's page, loaded once for the module (the tests run in file order on
    it); without a browser the test FAILS there, with the reason."""
    def get():
        driver, reason = browser
        if driver is None:
            pytest.fail(reason)
        if "page" not in loaded:
            url, _ = app
            driver.get(url + "/")
            wait_for(driver, lambda d: d.find_element("tag name", "body").get_attribute("data-ready") == "1",
                     "the page to load its choices")
            loaded["page"] = driver
        return loaded["page"]
    return get


# -- helpers ----------------------------------------------------------------------------------------------------

def wait_for(driver, condition, what, timeout=30):
    from selenium.webdriver.support.ui import WebDriverWait
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except Exception:  # noqa: BLE001
        message = driver.find_element("id", "message").text
        pytest.fail(f"timed out after {timeout} s waiting for {what} (page message: {message!r})")


def by_id(driver, id_):
    return driver.find_element("id", id_)


def select(driver, id_, value):
    from selenium.webdriver.support.ui import Select
    Select(by_id(driver, id_)).select_by_value(value)


def options_of(driver, id_):
    return [o.get_attribute("value") for o in by_id(driver, id_).find_elements("tag name", "option")]


def fill(driver, id_, value):
    field = by_id(driver, id_)
    field.clear()
    field.send_keys(value)


def finished_count(driver):
    return int(driver.find_element("tag name", "body").get_attribute("data-finished") or 0)


def submit_and_wait(driver, button_id, timeout=60):
    """Click, wait until that submission ends; its state (done | error | cancelled | refused)."""
    before = finished_count(driver)
    by_id(driver, button_id).click()
    wait_for(driver, lambda d: finished_count(d) > before, f"the {button_id} run to end", timeout)
    return driver.find_element("tag name", "body").get_attribute("data-last-state")


def fetch_bytes(driver, url):
    """The bytes the page gets for ``url`` (fetched by the page's own JavaScript)."""
    b64 = driver.execute_async_script("""
        const done = arguments[arguments.length - 1];
        fetch(arguments[0]).then(r => r.arrayBuffer()).then(buf => {
          let s = ""; for (const b of new Uint8Array(buf)) s += String.fromCharCode(b); done(btoa(s));
        }).catch(e => done("ERROR " + e));""", url)
    assert not b64.startswith("ERROR"), b64
    return base64.b64decode(b64)


def cli_images(tmp_path, argv):
    from ldm.pipelines import txt2img
    txt2img.run(txt2img.build_parser().parse_args(argv + ["--outdir", str(tmp_path), "--skip_grid"]))
    return sorted((tmp_path / "samples").glob("?????.png"))


# -- the scenario (in file order, on one page) -----------------------------------------------------------------

def test_page_loads_from_the_app_only(app, open_page):
    page = open_page()
    url, _ = app
    from ldm import methods
    from ldm.samplers import SAMPLERS
    assert options_of(page, "method") == list(methods.names())
    assert options_of(page, "sampler") == list(SAMPLERS)
    assert options_of(page, "model")[0] == "checkpoints/demo/shapes32.ckpt"
    assert options_of(page, "up-method") == list(methods.img2img_names())
    resources = page.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert resources and all(r.startswith(url + "/") for r in resources), resources
    errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors


def test_scalecrafter_64_result_and_metadata(app, open_page, tmp_path):
    page = open_page()
    select(page, "method", "scalecrafter")
    assert "configs/scalecrafter/demo_64x64.yaml" in options_of(page, "preset")
    select(page, "preset", "configs/scalecrafter/demo_64x64.yaml")
    assert (by_id(page, "H").get_attribute("value"), by_id(page, "W").get_attribute("value")) == ("64", "64")
    assert by_id(page, "steps").get_attribute("value") == "25"  # the preset's suggestion
    fill(page, "prompt", "a red circle")
    fill(page, "steps", STEPS)
    fill(page, "seed", "3")
    fill(page, "batch", "2")
    assert submit_and_wait(page, "generate") == "done"
    card = page.find_elements("css selector", "#gallery article.job")[0]
    figures = card.find_elements("css selector", "figure.result-figure")
    assert len(figures) == 2
    img = figures[0].find_element("css selector", "img.result")
    assert page.execute_script("return [arguments[0].complete, arguments[0].naturalWidth, "
                               "arguments[0].naturalHeight]", img) == [True, 64, 64]
    link = figures[0].find_element("css selector", "a.download")
    assert link.get_attribute("download").endswith(".png")
    data = fetch_bytes(page, link.get_attribute("href"))
    png = Image.open(io.BytesIO(data))
    assert png.format == "PNG" and png.size == (64, 64)
    params = json.loads(png.text["parameters"])
    assert png.text["prompt"] == "a red circle" and png.text["seed"] == "3"
    assert (params["method"], params["H"], params["W"], params["steps"], params["scale"], params["eta"]) == \
        ("scalecrafter", 64, 64, int(STEPS), 3.0, 1.0)
    assert Path(params["scalecrafter"]).name == "demo_64x64.yaml"
    # the metadata shown on the page is the file's
    shown = page.execute_script("return arguments[0].textContent",
                                figures[0].find_element("css selector", "pre.meta"))
    assert json.loads(shown)["parameters"] == params
    # the command line with the same settings writes the same image
    (first, _) = cli_images(tmp_path, [
        "--config", str(REPO_ROOT / "configs/demo/shapes32.yaml"), "--ckpt",
        str(REPO_ROOT / "checkpoints/demo/shapes32.ckpt"), "--device", "cpu", "--method", "scalecrafter",
        "--scalecrafter_config", str(REPO_ROOT / "configs/scalecrafter/demo_64x64.yaml"), "--prompt",
        "a red circle", "--H", "64", "--W", "64", "--steps", STEPS, "--ddim_eta", "1.0", "--scale", "3.0",
        "--seed", "3", "--n_samples", "2"])
    assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(Image.open(first).convert("RGB")))


def test_bad_input_is_a_message(open_page):
    page = open_page()
    fill(page, "seed", "-1")
    assert submit_and_wait(page, "generate") == "refused"
    message = by_id(page, "message")
    assert message.is_displayed()
    assert message.text.startswith("error: argument --seed: -1 is outside the allowed range")
    assert "Traceback" not in page.find_element("tag name", "body").text
    fill(page, "seed", "3")


def test_cancel_a_long_run(app, open_page):
    page = open_page()
    _, runner = app
    fill(page, "steps", "999")
    fill(page, "batch", "1")
    before = finished_count(page)
    by_id(page, "generate").click()
    wait_for(page, lambda d: by_id(d, "state").text == "running", "the long run to start")
    by_id(page, "cancel").click()
    wait_for(page, lambda d: finished_count(d) > before, "the cancelled run to end", timeout=15)
    assert page.find_element("tag name", "body").get_attribute("data-last-state") == "cancelled"
    assert by_id(page, "message").text.startswith("cancelled")
    assert float(by_id(page, "progress").get_attribute("value")) < 0.5
    assert not runner.run_lock.locked()


def test_switch_method_and_cascade_stages(open_page):
    page = open_page()
    assert page.find_elements("id", "opt-dilate")  # ScaleCrafter's own options
    select(page, "method", "freescale")
    assert not page.find_elements("id", "opt-dilate")
    assert page.find_elements("id", "opt-restart_step") and page.find_elements("id", "opt-fast_mode")
    assert "configs/freescale/demo_64x64.yaml" in options_of(page, "preset")
    assert by_id(page, "preset-flag").text == "--freescale_config"
    assert by_id(page, "stages-label").is_displayed()
    select(page, "preset", "configs/freescale/demo_64x64.yaml")
    fill(page, "steps", STEPS)
    by_id(page, "save_stages").click()
    assert submit_and_wait(page, "generate") == "done"
    done = [li.text for li in page.find_elements("css selector", "#stages-done li")]
    assert done == ["stage 1/2: 32×32 ✓", "stage 2/2: 64×64 ✓"]
    card = page.find_elements("css selector", "#gallery article.job")[0]
    assert card.find_element("tag name", "h3").text == "FreeScale 64×64"
    assert len(card.find_elements("css selector", ".stage-images img")) == 1


def test_use_this_image_upscales(open_page):
    page = open_page()
    first = page.find_elements("css selector", "#gallery figure.result-figure")[0]
    first.find_element("css selector", "button.use").click()
    assert by_id(page, "upscale-panel").is_displayed()
    select(page, "up-method", "scalecrafter")
    assert by_id(page, "up-preset").get_attribute("value") == "configs/scalecrafter/demo_128x128.yaml"
    fill(page, "up-steps", STEPS)
    assert submit_and_wait(page, "upscale") == "done"
    card = page.find_elements("css selector", "#gallery article.job")[0]
    assert card.get_attribute("data-kind") == "img2img"
    img = card.find_element("css selector", "img.result")
    assert page.execute_script("return [arguments[0].naturalWidth, arguments[0].naturalHeight]", img) == [128, 128]
    meta = json.loads(page.execute_script("return arguments[0].textContent",
                                          card.find_element("css selector", "pre.meta")))
    assert meta["parameters"]["mode"] == "img2img" and meta["parameters"]["input_size"] == [64, 64]
    # no console error but the refused form's 400 (test_bad_input_is_a_message)
    refusal = ("/api/generate", "status of 400")
    errors = [e for e in page.get_log("browser") if e["level"] == "SEVERE"
              and not (e["source"] == "network" and all(w in e["message"] for w in refusal))]
    assert errors == [], errors
    target = os.environ.get("APP_SCREENSHOT")
    if target:
        page.set_window_size(1400, 1150)
        page.execute_script("window.scrollTo(0, 0)")
        time.sleep(0.3)
        page.save_screenshot(str(target))
