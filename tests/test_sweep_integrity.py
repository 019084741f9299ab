"""What a resumed sweep trusts, and how files are written: damaged images are found and re-rendered,
the manifest carries (and checks) a sha256 per image, writers fsync before renaming, and finished files
get the permissions of a normal file under the user's umask (not mkstemp's 0600)."""
import hashlib
import io
import json
import os
import stat

import numpy as np
import pytest
from PIL import Image

from ldm.pipelines import sweep
from ldm.inference import save_png
from ldm.unet_hooks import dispersion

PROMPTS = ["a red circle", "a blue square", "a green tree", "a cat on a mat"]
EXPECTED = sorted(sweep.image_name(p, k) for p in range(4) for k in range(2))  # 8 images, batches of 3: 3, 3, 2
SETTINGS = {"steps": 3, "H": 6, "W": 4, "device": "cpu"}  # images are 4 wide, 6 high


class FakeRender:
    def __init__(self):
        self.calls = []

    def __call__(self, items):
        self.calls.append([it.index for it in items])
        return [Image.fromarray(np.full((6, 4, 3), (it.seed % 251, it.index, 9), np.uint8)) for it in items]


def run(outdir, render=None, settings=SETTINGS):
    render = render or FakeRender()
    return sweep.run_sweep(render, PROMPTS, 2, 3, 11, outdir, settings, progress=False), render


def manifest(outdir):
    return [json.loads(line) for line in (outdir / sweep.MANIFEST_FILE).read_text().splitlines()]


def png_bytes(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_damaged_images_are_rerendered(tmp_path, capsys):
    run(tmp_path)
    samples = tmp_path / "samples"
    good = {n: (samples / n).read_bytes() for n in EXPECTED}
    assert [r["sha256"] for r in manifest(tmp_path)] == [hashlib.sha256(good[n]).hexdigest() for n in EXPECTED]

    (samples / EXPECTED[0]).write_bytes(b"")  # batch 0: zero bytes
    (samples / EXPECTED[4]).write_bytes(good[EXPECTED[4]][:-20])  # batch 1: truncated (no IEND)
    (samples / EXPECTED[5]).write_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))  # batch 1: a valid 4x4 PNG
    other = np.asarray(Image.open(io.BytesIO(good[EXPECTED[7]]))).copy()
    other[0, 0, 0] ^= 1  # batch 2: right size, decodes, but not the file the manifest recorded
    (samples / EXPECTED[7]).write_bytes(png_bytes(other))
    capsys.readouterr()

    res, render = run(tmp_path)
    log = capsys.readouterr().out
    assert res == {"generated": 4, "batches": 3, "skipped": 4, "damaged": 4, "total": 8}
    assert render.calls == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert "re-rendering 4 damaged images: " in log
    for name, why in ((EXPECTED[0], "empty file"), (EXPECTED[4], "truncated PNG"), (EXPECTED[5], "is 4x4, not 4x6"),
                      (EXPECTED[7], "sha256 differs from the manifest")):
        assert f"{name} ({why}" in log
    assert "4 already complete (skipped)" in log
    assert sorted(os.listdir(samples)) == EXPECTED
    assert {n: (samples / n).read_bytes() for n in EXPECTED} == good  # the same files as the first run
    man = manifest(tmp_path)
    assert [r["file"] for r in man] == [f"samples/{n}" for n in EXPECTED]
    assert [r["sha256"] for r in man] == [hashlib.sha256(good[n]).hexdigest() for n in EXPECTED]

    res, render = run(tmp_path)  # now nothing is damaged
    assert res["damaged"] == 0 and res["generated"] == 0 and render.calls == []


def test_truncated_png_is_found_by_decoding_too(tmp_path):
    """A PNG cut inside its pixel data (even one that still ends like a PNG) fails the full decode."""
    run(tmp_path)
    path = tmp_path / "samples" / EXPECTED[2]
    data = path.read_bytes()
    assert sweep.check_image(path, (4, 6))[0] is None
    path.write_bytes(data[:40] + data[-12:])  # header kept, pixel data cut, IEND kept
    problem = sweep.check_image(path, (4, 6))[0]
    assert problem is not None and problem.startswith("does not decode")
    res, render = run(tmp_path)
    assert res["damaged"] == 1 and render.calls == [[0, 1, 2]]
    assert sweep.check_image(path, (4, 6), manifest(tmp_path)[2]["sha256"])[0] is None


def test_old_manifest_without_hashes_is_read_and_completed(tmp_path, capsys):
    run(tmp_path)
    old_lines = []
    for r in manifest(tmp_path):  # the format before sha256 was added
        del r["sha256"]
        old_lines.append(json.dumps(r, sort_keys=True))
    (tmp_path / sweep.MANIFEST_FILE).write_text("\n".join(old_lines) + "\n")
    (tmp_path / "samples" / EXPECTED[3]).write_bytes(b"")  # checked without a hash: still found
    capsys.readouterr()
    res, render = run(tmp_path)
    assert res["damaged"] == 1 and res["generated"] == 1 and render.calls == [[3, 4, 5]]
    assert f"re-rendering 1 damaged image: {EXPECTED[3]} (empty file)" in capsys.readouterr().out
    man = manifest(tmp_path)
    assert len(man) == 8
    for r in man:
        assert r["sha256"] == hashlib.sha256((tmp_path / r["file"]).read_bytes()).hexdigest()


def test_size_check_uses_image_size_over_settings(tmp_path):
    run(tmp_path)
    res = sweep.run_sweep(FakeRender(), PROMPTS, 2, 3, 11, tmp_path, SETTINGS, progress=False, image_size=(6, 4))
    assert res["damaged"] == 8  # every file is 4x6, not the 6x4 asked for
    with pytest.raises(FileNotFoundError):
        sweep.check_image(tmp_path / "samples" / "no_such.png")


# ------------------------------------------------------------------------------------------------
# permissions
# ------------------------------------------------------------------------------------------------
def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_files_get_the_umask_permissions(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        save_png(Image.new("RGB", (2, 2)), tmp_path / "one.png", {"prompt": "x"})
        run(tmp_path / "sweep")
        dispersion.clear_cache()
        dispersion.get_dispersion_transform(cache_dir=tmp_path / "cache")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "one.png") == mode
    out = tmp_path / "sweep"
    for path in [out / sweep.MANIFEST_FILE, out / sweep.SETTINGS_FILE] + sorted((out / "samples").iterdir()):
        assert _mode(path) == mode, path
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and _mode(cached[0]) == mode


# ------------------------------------------------------------------------------------------------
# fsync before the rename, and of the folder after it
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def io_events(monkeypatch):
    """Records fsync (of a file or a folder, with its path where known) and os.replace calls, in order."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind, os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else None))
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def _check_durable_write(events, dst):
    """For the write of ``dst``: fsync of the temporary file, then the rename, then fsync of the folder."""
    i = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(dst))
    tmp = events[i][1]
    before = [e for e in events[:i] if e[0] == "fsync" and e[1] == "file"]
    assert before, f"no fsync before renaming {dst}"
    if before[-1][2] is not None:
        assert before[-1][2] == tmp  # it was the temporary file that was synced
    after = [e for e in events[i + 1:] if e[0] == "fsync"]
    assert after and after[0][1] == "dir", f"no fsync of the folder after renaming {dst}"
    if after[0][2] is not None:
        assert after[0][2] == str(dst.parent)


def test_save_png_fsyncs_file_then_folder(tmp_path, io_events):
    save_png(Image.new("RGB", (3, 3)), tmp_path / "a.png")
    assert [e[0] for e in io_events] == ["fsync", "replace", "fsync"]
    _check_durable_write(io_events, tmp_path / "a.png")
    assert Image.open(tmp_path / "a.png").size == (3, 3)


def test_sweep_writes_are_durable(tmp_path, io_events):
    run(tmp_path)
    for path in [tmp_path / sweep.SETTINGS_FILE, tmp_path / sweep.MANIFEST_FILE] + \
            [tmp_path / "samples" / n for n in EXPECTED]:
        _check_durable_write(io_events, path)
