"""The one image reader (ldm/image_io.py) and the one folder walker (issue #26, items 5 and 6).

Every expectation is computed here from the pixel values the file was built from (an 8-bit array, x257 for
16 bits; the compositing and CMYK formulas written out), not by the reader's code path."""
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import REPO_ROOT, load_script
from ldm.image_io import ImageReadError, image_size, list_files, read_rgb, read_rgb_array
from ldm.inference import UsageError

RNG = np.random.default_rng(26)
RGB8 = RNG.integers(0, 256, (6, 5, 3), dtype=np.uint8)          # (H, W, 3)
GREY8 = RNG.integers(0, 256, (6, 5), dtype=np.uint8)
ALPHA = np.array([0, 1, 64, 127, 128, 200, 254, 255] * 4, dtype=np.uint8)[:30].reshape(6, 5)


def _over_white(rgb, alpha):
    """out = a * c + (1 - a) * 255 with a = alpha / 255, rounded to nearest (no ties: 255 is odd)."""
    a = alpha.astype(np.float64)[..., None] / 255.0
    return np.floor(a * rgb.astype(np.float64) + (1.0 - a) * 255.0 + 0.5).astype(np.uint8)


def _png(path, arr, bit_depth, color_type):
    """A PNG written byte by byte (PIL cannot write 16-bit RGB): IHDR, one zlib IDAT (filter 0 rows), IEND."""
    h, w = arr.shape[:2]
    raw = b"".join(b"\x00" + arr[y].astype(">u2" if bit_depth == 16 else "u1").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
                     + chunk(b"IEND", b""))
    return path


# ---------------------------------------------------------------------------------------------------------------
# each kind of image against its independent expectation
# ---------------------------------------------------------------------------------------------------------------
def test_16_bit_greyscale(tmp_path):
    path = _png(tmp_path / "g16.png", GREY8.astype(np.uint16) * 257, 16, 0)
    assert Image.open(path).mode.startswith("I")  # what PIL's convert("RGB") clips to white
    assert np.array_equal(read_rgb_array(path), np.repeat(GREY8[..., None], 3, axis=2))
    # not only exact multiples of 257: round(v / 257)
    v = np.array([[0, 128, 129, 385, 386, 65535, 65407, 65408, 32896, 1000]], dtype=np.uint16)
    want = np.floor(v.astype(np.float64) / 257.0 + 0.5).astype(np.uint8)
    assert np.array_equal(read_rgb_array(_png(tmp_path / "v.png", v, 16, 0))[..., 0], want)


def test_16_bit_rgb_and_rgba(tmp_path):
    assert np.array_equal(read_rgb_array(_png(tmp_path / "c16.png", RGB8.astype(np.uint16) * 257, 16, 2)), RGB8)
    rgba16 = np.concatenate([RGB8, ALPHA[..., None]], axis=2).astype(np.uint16) * 257
    assert np.array_equal(read_rgb_array(_png(tmp_path / "ca16.png", rgba16, 16, 6)), _over_white(RGB8, ALPHA))


def test_alpha_is_composited_over_white(tmp_path):
    Image.fromarray(np.concatenate([RGB8, ALPHA[..., None]], axis=2), "RGBA").save(tmp_path / "rgba.png")
    assert np.array_equal(read_rgb_array(tmp_path / "rgba.png"), _over_white(RGB8, ALPHA))
    # fully transparent pixels are white whatever colour they store
    assert (read_rgb_array(tmp_path / "rgba.png")[ALPHA == 0] == 255).all()
    Image.fromarray(np.stack([GREY8, ALPHA], axis=2), "LA").save(tmp_path / "la.png")
    want = _over_white(np.repeat(GREY8[..., None], 3, axis=2), ALPHA)
    assert np.array_equal(read_rgb_array(tmp_path / "la.png"), want)
    # 8-bit grey + alpha written by hand too (colour type 4)
    assert np.array_equal(read_rgb_array(_png(tmp_path / "la8.png", np.stack([GREY8, ALPHA], 2), 8, 4)), want)


def test_palette_with_transparency(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [10, 20, 30], [0, 0, 0]], dtype=np.uint8)
    idx = RNG.integers(0, 4, (6, 5), dtype=np.uint8)
    im = Image.fromarray(idx, "P")
    im.putpalette(palette.flatten().tolist())
    im.save(tmp_path / "p1.png", transparency=3)  # index 3 fully transparent (tRNS)
    want = palette[idx].copy()
    want[idx == 3] = 255
    assert np.array_equal(read_rgb_array(tmp_path / "p1.png"), want)
    im.save(tmp_path / "p2.png", transparency=bytes([255, 128, 0, 255]))  # per-index alpha
    alpha = np.array([255, 128, 0, 255], dtype=np.uint8)[idx]
    assert np.array_equal(read_rgb_array(tmp_path / "p2.png"), _over_white(palette[idx], alpha))
    im.save(tmp_path / "p3.gif", transparency=1)
    want = palette[idx].copy()
    want[idx == 1] = 255
    assert np.array_equal(read_rgb_array(tmp_path / "p3.gif"), want)


def test_cmyk(tmp_path):
    cmyk = RNG.integers(0, 256, (6, 5, 4), dtype=np.uint8)
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "c.tif")
    c = cmyk.astype(np.float64)
    want = np.floor((255.0 - c[..., :3]) * (255.0 - c[..., 3:]) / 255.0 + 0.5).astype(np.uint8)
    assert np.array_equal(read_rgb_array(tmp_path / "c.tif"), want)


@pytest.mark.parametrize("orientation,transform", [
    (1, lambda a: a),
    (2, lambda a: a[:, ::-1]),                          # mirrored left-right
    (3, lambda a: a[::-1, ::-1]),                       # upside down
    (4, lambda a: a[::-1]),                             # mirrored top-bottom
    (5, lambda a: a.transpose(1, 0, 2)),                # transposed
    (6, lambda a: a[::-1].transpose(1, 0, 2)),          # rotated 90 degrees clockwise to show
    (7, lambda a: a[::-1, ::-1].transpose(1, 0, 2)),    # transverse
    (8, lambda a: a[:, ::-1].transpose(1, 0, 2)),       # rotated 90 degrees counter-clockwise to show
])
def test_exif_orientation(tmp_path, orientation, transform):
    im = Image.fromarray(RGB8)
    exif = im.getexif()
    exif[0x0112] = orientation
    path = tmp_path / "o.png"
    im.save(path, exif=exif)
    want = transform(RGB8)
    assert np.array_equal(read_rgb_array(path), want)
    assert image_size(path) == (want.shape[1], want.shape[0])
    from PIL import ImageOps
    with Image.open(path) as opened:  # and what viewers (PIL's exif_transpose) show
        assert np.array_equal(np.asarray(ImageOps.exif_transpose(opened).convert("RGB")), want)


def test_plain_images_are_unchanged(tmp_path):
    Image.fromarray(RGB8).save(tmp_path / "rgb.png")
    Image.fromarray(GREY8).save(tmp_path / "l.png")
    assert np.array_equal(read_rgb_array(tmp_path / "rgb.png"), RGB8)
    assert np.array_equal(read_rgb_array(tmp_path / "l.png"), np.repeat(GREY8[..., None], 3, axis=2))
    out = read_rgb(tmp_path / "rgb.png")
    assert out.mode == "RGB" and out.size == (5, 6)
    assert read_rgb_array(tmp_path / "rgb.png").flags.writeable


# ---------------------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------------------
def _bomb(path, w=20000, h=20000):
    """A PNG whose header says w x h (8-bit grey) with a one-row IDAT: 50 bytes on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * (w + 1))) + chunk(b"IEND", b""))
    return path


def test_errors_name_the_file(tmp_path):
    bomb = _bomb(tmp_path / "bomb.png")
    for fn in (read_rgb_array, image_size):
        with pytest.raises(ImageReadError, match=rf"^--image {bomb}: .*20000x20000|^--image {bomb}: .*400,000,000"):
            fn(bomb, "--image")
    (tmp_path / "text.png").write_text("not an image")
    with pytest.raises(ImageReadError, match=f"{tmp_path / 'text.png'}: not an image file"):
        read_rgb_array(tmp_path / "text.png")
    with pytest.raises(ImageReadError, match="no such file"):
        read_rgb_array(tmp_path / "missing.png")
    Image.fromarray(RGB8).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageReadError, match=f"{tmp_path / 'cut.png'}: "):
        read_rgb_array(tmp_path / "cut.png")
    assert issubclass(ImageReadError, UsageError)  # the scripts print it as one `error:` line, exit 2


def test_upscale_cli_bomb_is_one_error_line(tmp_path, capsys):
    import zipfile
    ckpt = tmp_path / "x4.ckpt"
    with zipfile.ZipFile(ckpt, "w") as z:  # passes the file check; never loaded: the image is refused first
        z.writestr("archive/data.pkl", b"")
    bomb = _bomb(tmp_path / "bomb.png")
    out = tmp_path / "out"
    code = load_script("upscale").main(["--image", str(bomb), "--config", str(REPO_ROOT / "configs/tiny/tiny-x4-upscaler.yaml"),
                                        "--ckpt", str(ckpt), "--outdir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: --image {bomb}: ") and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------------
# the call sites read through it
# ---------------------------------------------------------------------------------------------------------------
def test_eval_features_read_16_bit_as_8_bit(tmp_path):
    from ldm.evaluation.features import list_image_files, load_rgb
    _png(tmp_path / "a16.png", RGB8.astype(np.uint16) * 257, 16, 2)
    _png(tmp_path / "b16.png", GREY8.astype(np.uint16) * 257, 16, 0)
    Image.fromarray(RGB8).save(tmp_path / "a8.png")
    Image.fromarray(GREY8).save(tmp_path / "b8.png")
    assert list_image_files(tmp_path) == ["a16.png", "a8.png", "b16.png", "b8.png"]
    # identical pixels, hence identical features and a FID of 0 between the 16-bit and the 8-bit copies
    assert np.array_equal(load_rgb(tmp_path / "a16.png"), load_rgb(tmp_path / "a8.png"))
    assert np.array_equal(load_rgb(tmp_path / "b16.png"), load_rgb(tmp_path / "b8.png"))


def test_init_image_reads_16_bit(tmp_path):
    from ldm.methods.cascade import read_image_tensor  # what --init_image and img2img read images with
    _png(tmp_path / "g16.png", GREY8.astype(np.uint16) * 257, 16, 0)
    x = read_image_tensor(tmp_path / "g16.png", (6, 5), "cpu")  # same size: no resampling
    want = torch.from_numpy(np.repeat(GREY8[None].astype(np.float32), 3, axis=0))[None] / 127.5 - 1.0
    assert torch.equal(x, want)


@pytest.fixture(scope="module")
def sd2_ckpt(tmp_path_factory):
    from omegaconf import OmegaConf
    make = load_script("make_random_checkpoint")
    sd = make.make_random_state_dict(OmegaConf.load(REPO_ROOT / "configs/tiny/tiny-sd2.yaml"), seed=3, std=0.05)
    return make.save_checkpoint(sd, tmp_path_factory.mktemp("img") / "sd2w.ckpt")


def test_upscale_strength_0_of_a_16_bit_image_is_the_8_bit_result(tmp_path, sd2_ckpt):
    """The issue's case: --strength 0 returned white for a 16-bit greyscale input."""
    y, x = np.mgrid[0:48, 0:40]
    grey = ((y * 5 + x * 3) % 256).astype(np.uint8)
    _png(tmp_path / "g16.png", grey.astype(np.uint16) * 257, 16, 0)
    Image.fromarray(grey).save(tmp_path / "g8.png")
    upscale = load_script("upscale")
    outs = {}
    for name in ("g16", "g8"):
        out = tmp_path / f"out_{name}"
        assert upscale.main(["--image", str(tmp_path / f"{name}.png"), "--config",
                             str(REPO_ROOT / "configs/tiny/tiny-sd2.yaml"), "--ckpt", str(sd2_ckpt), "--outdir",
                             str(out), "--method", "freescale", "--strength", "0", "--steps", "2",
                             "--W", "80", "--seed", "5"]) == 0
        outs[name] = np.asarray(Image.open(out / "00000.png").convert("RGB"))
    assert np.array_equal(outs["g16"], outs["g8"])
    assert outs["g16"].mean() < 200 and outs["g16"].std() > 10  # an image, not white


# ---------------------------------------------------------------------------------------------------------------
# the folder walker: links followed, each real folder and file once, no loops
# ---------------------------------------------------------------------------------------------------------------
def _two_images(folder):
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.fromarray(RGB8).save(folder / name)
    return folder


def _walk_in_subprocess(folder, timeout=120):
    """len(list_image_files(folder)) and the warnings, in a child process with a timeout (a walker that loops
    must fail the test, not hang it)."""
    code = ("import sys, warnings\nfrom ldm.evaluation.features import list_image_files\n"
            "with warnings.catch_warnings(record=True) as w:\n    warnings.simplefilter('always')\n"
            "    files = list_image_files(sys.argv[1])\n"
            "print(len(files)); print('|'.join(files)); print(len(w)); [print(str(x.message)) for x in w]\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    return int(lines[0]), lines[1].split("|") if lines[1] else [], lines[3:3 + int(lines[2])]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_link_to_the_parent_counts_each_image_once(tmp_path):
    folder = _two_images(tmp_path / "imgs")
    os.symlink("..", folder / "up")
    n, files, warns = _walk_in_subprocess(folder)
    assert (n, files) == (2, ["a.png", "b.png"])
    assert len(warns) == 1 and str(folder / "up") in warns[0] and "not followed" in warns[0]


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_self_link_and_parent_link_finish(tmp_path):
    folder = _two_images(tmp_path / "imgs")
    os.symlink(".", folder / "self")
    os.symlink("..", folder / "up")
    (folder / "sub").mkdir()
    os.symlink("../..", folder / "sub" / "upup")
    n, files, warns = _walk_in_subprocess(folder)
    assert (n, files) == (2, ["a.png", "b.png"])
    assert len(warns) == 3


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="no symbolic links")
def test_linked_folders_and_files_are_read_once(tmp_path):
    folder = _two_images(tmp_path / "imgs")
    outside = _two_images(tmp_path / "elsewhere" / "set")
    Image.fromarray(RGB8).save(outside / "c.png")
    os.symlink(outside, folder / "linked")           # a folder of images linked in: read
    os.symlink(outside, folder / "linked_again")     # the same folder twice: once
    os.symlink(folder / "a.png", folder / "a_link.png")  # a file reached twice: once
    os.symlink(tmp_path / "nowhere", folder / "broken")  # ignored
    (folder / "sub").mkdir()
    os.symlink("../linked", folder / "sub" / "deep")  # a link to a link of the same folder: once
    assert list_files(folder, (".png",)) == ["a.png", "b.png", "linked/a.png", "linked/b.png", "linked/c.png"]
    assert len(list_files(folder)) == 5
