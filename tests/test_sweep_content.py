"""Sweeps keyed by content (issue #26, item 3): a replaced checkpoint, an edited preset or settings file, or changed
method code is not the sweep that was started; resuming it is refused, naming what changed.

The content keys are checked against independent computations (hashlib over the file's bytes), and end to end on
the demo model (64x64, one image: about a second per run)."""
import hashlib
import json
import os
import shutil
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT
from ldm.inference import UsageError
from ldm.pipelines import content, sweep
from ldm.pipelines import txt2img

DEMO_CONFIG = REPO_ROOT / "configs/demo/shapes32.yaml"
DEMO_CKPT = REPO_ROOT / "checkpoints/demo/shapes32.ckpt"
PRESET = REPO_ROOT / "configs/scalecrafter/demo_64x64.yaml"
SETTINGS_FILE = REPO_ROOT / "configs/scalecrafter/settings/demo/inner_x2.txt"


# ------------------------------------------------------------------------------------------------
# the keys
# ------------------------------------------------------------------------------------------------
def test_small_file_is_keyed_by_its_whole_content(tmp_path):
    f = tmp_path / "a.bin"
    f.write_bytes(b"x" * 1000)
    fp = content.file_fingerprint(f)
    assert fp == {"file": f.as_posix(), "size": 1000, "sha256": hashlib.sha256(b"x" * 1000).hexdigest()}
    os.utime(f, ns=(1, 1))  # a small file: the time does not matter, the bytes do
    assert content.file_fingerprint(f) == fp
    f.write_bytes(b"x" * 999 + b"y")
    assert content.file_fingerprint(f)["sha256"] == hashlib.sha256(b"x" * 999 + b"y").hexdigest()
    assert content.file_fingerprint(tmp_path / "none") == {"file": (tmp_path / "none").as_posix(), "missing": True}


def test_large_file_is_keyed_by_size_time_and_both_ends(tmp_path):
    mib = 1 << 20
    n = content.SMALL_FILE_BYTES + 3 * mib
    data = bytearray(np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8).tobytes())
    f = tmp_path / "big.ckpt"
    f.write_bytes(bytes(data))
    os.utime(f, ns=(10 ** 18, 10 ** 18))
    fp = content.file_fingerprint(f)
    assert fp == {"file": f.as_posix(), "size": n, "mtime_ns": 10 ** 18,
                  "head_tail_sha256": hashlib.sha256(bytes(data[:mib]) + bytes(data[-mib:])).hexdigest()}

    def rewritten(offset, ns=10 ** 18):
        d = bytearray(data)
        d[offset] ^= 1
        f.write_bytes(bytes(d))
        os.utime(f, ns=(ns, ns))
        return content.file_fingerprint(f)

    assert rewritten(5)["head_tail_sha256"] != fp["head_tail_sha256"]        # in the first MiB
    assert rewritten(n - 5)["head_tail_sha256"] != fp["head_tail_sha256"]    # in the last MiB (a zip's directory)
    middle = rewritten(n // 2, ns=10 ** 18 + 1)                                # in between: the time tells
    assert middle["head_tail_sha256"] == fp["head_tail_sha256"] and middle != fp
    assert content.describe_changes({"ckpt": fp}, {"ckpt": middle}) == [
        f"the checkpoint {f.as_posix()} changed (modification time)"]


def test_code_version_ignores_wording_and_sees_code(tmp_path):
    src = tmp_path / "m.py"
    src.write_text(textwrap.dedent('''\
        """Module docstring."""
        def f(x):
            """Doc."""
            return x + 1  # a comment
        '''))
    d0 = content.module_digest(src)
    src.write_text(textwrap.dedent('''\
        """Another docstring, reworded."""


        def f(x):
            # another comment
            return x + 1
        '''))
    assert content.module_digest(src) == d0
    src.write_text(src.read_text().replace("x + 1", "x + 2"))
    assert content.module_digest(src) != d0


def test_code_files_of_a_method_are_its_package_and_class_hierarchy():
    from ldm import methods
    sc = content.code_version(methods.method_class("scalecrafter"))
    want = {f"ldm/methods/scalecrafter/{p.name}" for p in (REPO_ROOT / "ldm/methods/scalecrafter").glob("*.py")}
    assert want <= set(sc) and "ldm/methods/base.py" in sc
    assert not any("freescale" in m for m in sc)
    direct = content.code_version(methods.method_class("direct"))
    assert "ldm/methods/direct.py" in direct and not any("scalecrafter" in m for m in direct)
    assert sc["ldm/methods/base.py"] == direct["ldm/methods/base.py"] == content.module_digest(
        REPO_ROOT / "ldm/methods/base.py")


def test_preset_key_covers_the_settings_files_it_names(tmp_path):
    from ldm import methods
    preset, settings = _copy_preset(tmp_path)
    keys = content.preset_files(methods.method_class("scalecrafter"), preset)
    assert set(keys) == {preset.as_posix(), settings.as_posix()}
    assert keys[settings.as_posix()]["sha256"] == hashlib.sha256(settings.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------
# sweeps
# ------------------------------------------------------------------------------------------------
def _copy_preset(tmp_path):
    (tmp_path / "settings/demo").mkdir(parents=True, exist_ok=True)
    preset = tmp_path / PRESET.name
    shutil.copy(PRESET, preset)
    settings = tmp_path / "settings/demo" / SETTINGS_FILE.name
    shutil.copy(SETTINGS_FILE, settings)
    return preset, settings


def test_resumed_sweep_with_other_files_is_refused(tmp_path, capsys):
    """The issue: the same command after editing a preset's settings file (or replacing the checkpoint) found the
    finished images and mixed the versions. Now it is refused (exit 2), naming the file, and writes nothing."""
    preset, settings = _copy_preset(tmp_path / "p")
    ckpt = tmp_path / "demo.ckpt"
    shutil.copy(DEMO_CKPT, ckpt)
    out = tmp_path / "out"
    args = [str(a) for a in ["--config", DEMO_CONFIG, "--ckpt", ckpt, "--outdir", out, "--scalecrafter_config", preset,
                             "--prompt", "a red circle", "--sweep", "--seed", "3", "--device", "cpu"]]
    assert txt2img.main(args) == 0
    capsys.readouterr()
    first = (out / "samples/000000_000.png").read_bytes()
    recorded = json.loads((out / sweep.SETTINGS_FILE).read_text())["settings"]["content"]
    assert recorded["ckpt"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    assert recorded["preset"][settings.as_posix()]["sha256"] == hashlib.sha256(settings.read_bytes()).hexdigest()

    text = settings.read_text()
    settings.write_text(text.replace(":2\n", ":3\n", 1))  # one layer dilated 3 instead of 2
    assert txt2img.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {out} holds a sweep made with other settings (preset file {settings.as_posix()} "
                          "changed (content))"), err
    settings.write_text(text)  # the original again: resumes (nothing to render)
    assert txt2img.main(args) == 0
    assert "1 already complete (skipped)" in capsys.readouterr().out

    sd = torch.load(ckpt, map_location="cpu", weights_only=True)  # "retrained": one weight changed
    key = next(k for k, v in sd["state_dict"].items() if v.is_floating_point())
    sd["state_dict"][key] = sd["state_dict"][key] + 1.0
    torch.save(sd, ckpt)
    assert txt2img.main(args) == 2
    err = capsys.readouterr().err
    assert f"the checkpoint {ckpt.as_posix()} changed (" in err and "content" in err
    assert (out / "samples/000000_000.png").read_bytes() == first  # nothing rewritten


def test_sweep_started_before_content_keys_is_refused_with_the_reason(tmp_path):
    def render(items):
        return [Image.fromarray(np.full((6, 4, 3), it.index, np.uint8)) for it in items]

    old = {"steps": 3, "H": 6, "W": 4}
    sweep.run_sweep(render, ["a"], 2, 2, 1, tmp_path, old, progress=False)
    new = {**old, "content": {"ckpt": {"file": "x.ckpt", "size": 1, "sha256": "00"}, "code": {}}}
    with pytest.raises(UsageError, match="started before the versions of its files and code were recorded"):
        sweep.run_sweep(render, ["a"], 2, 2, 1, tmp_path, new, progress=False)
    # the same settings with the same content resume; other code is refused, naming the module
    d = tmp_path / "b"
    sweep.run_sweep(render, ["a"], 2, 2, 1, d, new, progress=False)
    assert sweep.run_sweep(render, ["a"], 2, 2, 1, d, new, progress=False)["skipped"] == 2
    other = {**new, "content": {**new["content"], "code": {"ldm/methods/direct.py": "ff"}}}
    with pytest.raises(UsageError, match=r"the method's code changed \(ldm/methods/direct.py\)"):
        sweep.run_sweep(render, ["a"], 2, 2, 1, d, other, progress=False)


def test_a_model_folder_is_keyed_by_every_file_in_it(tmp_path):
    """--ckpt may be a diffusers-format folder: its key changes when any file in it changes or is added."""
    from ldm.pipelines.content import file_fingerprint
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "w.safetensors").write_bytes(b"abc")
    (folder / "model_index.json").write_text("{}")
    first = file_fingerprint(folder)
    assert first["folder"] and first["files"] == 2
    (folder / "unet" / "w.safetensors").write_bytes(b"abd")
    second = file_fingerprint(folder)
    (folder / "vae").mkdir()
    (folder / "vae" / "w.safetensors").write_bytes(b"x")
    third = file_fingerprint(folder)
    assert len({first["sha256"], second["sha256"], third["sha256"]}) == 3 and third["files"] == 3
