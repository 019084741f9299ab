"""The one reader for image files (``--init_image``, ``--detail_mask``, the upscaler's ``--image``, the FID / table
folders, the evaluation-set preparation): any file PIL opens becomes what it looks like, as 8-bit RGB. Also the one
walker of image folders, :func:`list_files` (symbolic links followed, each real folder and file once, no loops).

What ``convert("RGB")`` alone gets wrong, and what :func:`read_rgb` does instead:

* **16-bit and 32-bit greyscale** (``I;16``, ``I;16B``, ``I``; 16-bit PNGs open as these): PIL clips the values
  to 0..255, so a 16-bit picture turns (nearly) white. Here 16-bit values are scaled to 8 bits,
  ``round(v / 257)`` (65535 -> 255; an 8-bit value stored as ``v * 257`` comes back exactly). ``I`` images whose
  values fit in 16 bits (16-bit PNGs on some Pillow versions) are read the same way; wider ones are scaled from
  their own maximum range 0..2**31 - 1. Float images (``F``) are taken as 0..1 if all values are, else 0..255
  (clipped).
* **Transparency** (``RGBA``, ``LA``, ``PA``, palette or greyscale/RGB images with a transparent colour): PIL drops
  the alpha channel and shows whatever colour the transparent pixels store (often black, sometimes leftovers of
  an editor). Here the image is **composited over white**, ``out = alpha * colour + (1 - alpha) * 255``:
  a transparent image looks like this on a web page, in a document and in most viewers' default, and logos and
  line art (the usual images with transparency, mostly drawn dark on transparent) stay visible, where black
  would hide them. The composite is computed in 8-bit integers, rounded.
* **CMYK** (print JPEGs and TIFFs): ``R = (255 - C) * (255 - K) / 255`` (likewise G from M, B from Y), rounded;
  ICC profiles are ignored, for CMYK as for RGB files (no colour management anywhere in the package).
* **EXIF orientation** (camera JPEGs, also PNG/WebP/TIFF with EXIF): the pixels are rotated/flipped the way
  viewers show the image; :func:`image_size` reports that orientation's size.
* **Decompression bombs** (a small file whose header promises e.g. 20000 x 20000 pixels): an
  :class:`ImageReadError` naming the file, before anything is decoded. The limit is :data:`MAX_PIXELS` (or PIL's
  ``2 * Image.MAX_IMAGE_PIXELS`` if that is lower and set).
* 16-bit RGB(A) PNGs: PIL itself reduces them to 8 bits when it opens them (their high byte), so an 8-bit value
  stored as ``v * 257`` also comes back exactly.
* Multi-frame files (GIF, APNG, TIFF) give their first frame. A mode PIL cannot convert to RGB is an
  :class:`ImageReadError` saying so.

Every failure (missing file, not an image, truncated data, too large) is an :class:`ImageReadError`, a
:class:`~ldm.inference.UsageError`: the scripts print it as one ``error: ...`` line and exit with status 2.
"""
import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.errors import InputWarning, UsageError

# the most pixels an image file may have (268 M: 16384 x 16384, four times an 8192 x 8192 sample); 20000 x 20000
# headers, the usual decompression bomb, are above it. PIL's own limit (2 * Image.MAX_IMAGE_PIXELS, 179 M by
# default) applies where it is lower and set.
MAX_PIXELS = 2 ** 28
WHITE = 255  # the background transparent pixels are composited over (see the module docstring)


class ImageReadError(UsageError):
    """An image file cannot be read (missing, not an image, truncated, too large, unsupported mode); the message
    names the file."""


def _where(path, flag):
    return f"{flag} {path}" if flag else str(path)


def _pixel_limit(max_pixels=None):
    limits = [max_pixels if max_pixels is not None else MAX_PIXELS]
    if Image.MAX_IMAGE_PIXELS:  # PIL raises DecompressionBombError above twice this
        limits.append(2 * int(Image.MAX_IMAGE_PIXELS))
    return min(limits)


def _too_large(where, w, h, limit):
    return ImageReadError(f"{where}: the file says it is {w}x{h} pixels ({w * h:,}), more than the {limit:,} an image "
                          "file may have here (a decompression bomb: a small file that would decode to gigabytes?)")


def open_image(path, flag=None, max_pixels=None):
    """``Image.open`` with every failure an :class:`ImageReadError` naming the file (``flag`` first if given) and
    the pixel limit checked from the header, before any pixel is decoded. Close the result (``with``)."""
    where = _where(path, flag)
    p = Path(path)
    if not p.is_file():
        raise ImageReadError(f"{where}: no such file" if not p.exists() else f"{where}: not a file")
    limit = _pixel_limit(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the limit below decides
            im = Image.open(p)
    except Image.DecompressionBombError as err:
        n = re.search(r"\((\d+) pixels\)", str(err))
        pixels = f"{int(n.group(1)):,} pixels" if n else "too many pixels"
        raise ImageReadError(f"{where}: the file says it has {pixels}, more than the {limit:,} an image file may have "
                             "here (a decompression bomb: a small file that would decode to gigabytes?)") from None
    except UnidentifiedImageError:
        raise ImageReadError(f"{where}: not an image file (PIL recognises no image format in it)") from None
    except OSError as err:
        raise ImageReadError(f"{where}: cannot be read as an image ({err.strerror or err})") from None
    w, h = im.size
    if w * h > limit:
        im.close()
        raise _too_large(where, w, h, limit)
    return im


def _exif_orientation(im):
    try:
        return int(im.getexif().get(0x0112, 1) or 1)
    except Exception:  # a broken EXIF block: shown unrotated, as viewers do
        return 1


def image_size(path, flag=None, max_pixels=None):
    """(width, height) of an image file as :func:`read_rgb` returns it (EXIF orientation applied), from its header."""
    with open_image(path, flag, max_pixels) as im:
        w, h = im.size
        return (h, w) if _exif_orientation(im) in (5, 6, 7, 8) else (w, h)


def _to_uint8_grey(im):
    """A single-channel integer or float image as a uint8 array (see the module docstring)."""
    a = np.asarray(im)
    if im.mode == "F":
        a = a.astype(np.float64)
        a = a * 255.0 if a.size and np.nanmin(a) >= 0.0 and np.nanmax(a) <= 1.0 else a
        return np.clip(np.nan_to_num(np.rint(a)), 0, 255).astype(np.uint8)
    a = a.astype(np.int64)
    if im.mode.startswith("I;16") or (a.size and a.min() >= 0 and a.max() <= 65535):
        return ((np.clip(a, 0, 65535) + 128) // 257).astype(np.uint8)  # round(v / 257): v * 257 -> v
    return ((np.clip(a, 0, 2 ** 31 - 1) * 255 + (2 ** 31 - 1) // 2) // (2 ** 31 - 1)).astype(np.uint8)


def _over_white(rgb, alpha):
    """Composite uint8 (H, W, 3) colour with uint8 (H, W) alpha over white, rounded."""
    rgb, a = rgb.astype(np.int32), alpha.astype(np.int32)[..., None]
    return ((rgb * a + WHITE * (255 - a) + 127) // 255).astype(np.uint8)


def _decode_rgb_array(im, where):
    """uint8 (H, W, 3) of a loaded PIL image, before orientation; a mode that cannot be converted is an
    :class:`ImageReadError`."""
    try:
        return _convert(im)
    except (ValueError, OSError) as err:
        raise ImageReadError(f"{where}: images of mode {im.mode} cannot be converted to RGB ({err})") from None


def _convert(im):
    mode = im.mode
    key = im.info.get("transparency")
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        grey = _to_uint8_grey(im)
        rgb = np.repeat(grey[..., None], 3, axis=2)
        if isinstance(key, (int, float)) and mode != "F":  # a transparent grey value (16-bit PNG tRNS)
            alpha = np.where(np.asarray(im).astype(np.int64) == int(key), 0, 255).astype(np.uint8)
            rgb = _over_white(rgb, alpha)
        return rgb
    if mode == "CMYK":
        cmyk = np.asarray(im).astype(np.int32)
        k = 255 - cmyk[..., 3:4]
        return (((255 - cmyk[..., :3]) * k + 127) // 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode in ("P", "L", "RGB", "1") and key is not None):
        rgba = np.asarray(im.convert("RGBA"))  # PIL applies palette / tRNS transparency and un-premultiplies
        return _over_white(rgba[..., :3], rgba[..., 3])
    if mode == "RGB":
        return np.asarray(im)
    return np.asarray(im.convert("RGB"))


# EXIF orientation -> the transform that shows the stored pixels upright (EXIF 2.3, tag 0x0112): 2 mirror
# left-right, 3 rotate 180, 4 mirror top-bottom, 5 mirror left-right then rotate 90 counter-clockwise, 6 rotate 90
# clockwise, 7 mirror left-right then rotate 90 clockwise, 8 rotate 90 counter-clockwise
_ORIENT = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.rot90(a[:, ::-1], 1), 6: lambda a: np.rot90(a, -1),
           7: lambda a: np.rot90(a[:, ::-1], -1), 8: lambda a: np.rot90(a, 1)}


def read_rgb_array(path, flag=None, max_pixels=None):
    """An image file as a uint8 ``(H, W, 3)`` RGB array, as it looks (see the module docstring for 16-bit,
    transparency, CMYK and EXIF orientation). Failures raise :class:`ImageReadError` naming the file."""
    where = _where(path, flag)
    with open_image(path, flag, max_pixels) as im:
        try:
            im.seek(0)
            im.load()
        except (OSError, ValueError, SyntaxError, EOFError) as err:  # truncated or corrupt pixel data
            raise ImageReadError(f"{where}: the image data is truncated or corrupt ({err})") from None
        orientation = _exif_orientation(im)
        arr = _decode_rgb_array(im, where)
    arr = _ORIENT.get(orientation, lambda a: a)(arr)
    return np.require(arr, np.uint8, ["C_CONTIGUOUS", "WRITEABLE", "OWNDATA"])  # a copy the caller owns


def read_rgb(path, flag=None, max_pixels=None):
    """:func:`read_rgb_array` as an 8-bit RGB PIL image."""
    return Image.fromarray(read_rgb_array(path, flag, max_pixels), "RGB")


# --------------------------------------------------------------------------------------------------
# folders of images
# --------------------------------------------------------------------------------------------------

def list_files(folder, extensions=None):
    """Sorted POSIX paths, relative to ``folder``, of the files below it (names ending in one of ``extensions``,
    case-insensitive; all files if None). Hidden entries (``.name``) are skipped. The one folder walker of the
    package (FID / table folders, the evaluation-set preparation).

    Symbolic links are followed, with every real folder walked once and every real file counted once, so that a
    folder of images linked in from elsewhere (``ref/coco -> /data/coco/val``) is read, but no image is read twice:

    * a link to a folder that contains the one being read (``up -> ..``, ``self -> .``) would read it again, in a
      loop: it is not followed, with an :class:`~ldm.inference.InputWarning` naming it;
    * a link to a folder already walked (or a second link to the same place) is skipped;
    * a file reached twice (through links) counts once, under the first path in sorted order.

    Broken links are ignored."""
    root = Path(folder)
    root_real = os.path.realpath(root)
    exts = tuple(e.lower() for e in extensions) if extensions is not None else None
    visited, seen, out = {root_real}, set(), []
    stack = [""]
    while stack:
        rel = stack.pop()
        here = os.path.join(root, rel) if rel else str(root)
        try:
            entries = sorted(os.scandir(here), key=lambda e: e.name)
        except OSError:
            continue  # unreadable folder (permissions, vanished): nothing in it is listed
        subdirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = f"{rel}/{entry.name}" if rel else entry.name
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
                is_file = not is_dir and entry.is_file(follow_symlinks=True)
            except OSError:
                continue
            if is_dir:
                real = os.path.realpath(entry.path)
                if root_real == real or root_real.startswith(real.rstrip(os.sep) + os.sep):
                    warnings.warn(f"{root / child} links to {real}, a folder that contains {root}: not followed "
                                  "(it would read the folder again, in a loop)", InputWarning, stacklevel=2)
                    continue
                if real in visited:
                    continue
                visited.add(real)
                subdirs.append(child)
            elif is_file and (exts is None or entry.name.lower().endswith(exts)):
                real = os.path.realpath(entry.path)
                if real not in seen:
                    seen.add(real)
                    out.append(child)
        stack.extend(reversed(subdirs))  # depth first, in sorted order
    return sorted(out)


__all__ = ["ImageReadError", "MAX_PIXELS", "list_files", "open_image", "image_size", "read_rgb", "read_rgb_array"]
