"""Streaming Inception features of image folders: clean resize, native-resolution crops, caching.

Three feature kinds are extracted, each an ``(N, d)`` float32 array:

``pool3``        pool3 (2048-d) of every image resized to 299x299 the "clean" way  -> FID, KID
``spatial``      mixed_6/conv spatial features (2023-d) of the same resized images -> sFID, sKID
``patch_pool3``  pool3 of ``crops_per_image`` random ``crop x crop`` crops per image taken at the
                 image's own resolution (resized to 299 only if ``crop != 299``)   -> pFID, pKID

Clean resize (Parmar et al., 2022, clean-fid's default "clean" mode): every RGB channel is
converted to a 32-bit float PIL image (mode "F") and resized with PIL's antialiased bicubic filter
to 299x299; the result is clipped to [0, 255] and kept in float (no re-quantisation to uint8).

Folders are walked recursively (png/jpg/jpeg/webp/bmp/tif), images are decoded in DataLoader
workers and pushed through the network in batches; only features are kept in memory.  Results are
cached on disk per (folder listing, feature kind, settings, weights hash), so a 30k-image reference
folder is processed once.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ldm.image_io import image_size, list_files, read_rgb_array

from .inception import INPUT_SIZE
from .metrics import EvalError, EvalWarning

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
FEATURE_KINDS = ("pool3", "spatial", "patch_pool3")
RESIZE_ID = "clean: PIL bicubic per channel in float32 (mode F), clip [0,255], no quantization"
CACHE_VERSION = 2  # 2: images decoded by ldm.image_io (16-bit, alpha, CMYK, EXIF orientation)
CACHE_ENV = "SCALECRAFTER_EVAL_CACHE"


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def list_image_files(folder) -> List[str]:
    """Sorted POSIX paths, relative to ``folder``, of all images below it (hidden entries skipped), from the one
    folder walker :func:`ldm.image_io.list_files`: links are followed, each real folder walked once and each real
    file counted once; a link to a folder containing ``folder`` is not followed (a warning names it)."""
    root = Path(folder)
    if not root.is_dir():
        raise EvalError(f"not a folder: {folder}")
    return list_files(root, IMAGE_EXTENSIONS)


def folder_fingerprint(folder, relpaths: Sequence[str]) -> str:
    """Hash of the folder listing: relative path, byte size and mtime of every image file."""
    h = hashlib.sha256()
    root = Path(folder)
    for rel in relpaths:
        st = (root / rel).stat()
        h.update(f"{rel}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def load_rgb(path) -> np.ndarray:
    """Decode an image file to an ``(H, W, 3)`` uint8 RGB array with the package's one reader
    (:func:`ldm.image_io.read_rgb_array`: 16-bit scaled, transparency over white, CMYK, EXIF orientation)."""
    return read_rgb_array(path)


# --------------------------------------------------------------------------------------------
# resize and crops
# --------------------------------------------------------------------------------------------
def clean_resize(image: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """Resize an ``(H, W, 3)`` image (uint8 or float in [0, 255]) to ``(size, size, 3)`` float32.

    Each channel is resized on its own as a float PIL image with the bicubic filter (antialiased
    when downsampling), then clipped to [0, 255]; values are not rounded back to integers.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got {image.shape}")
    out = np.empty((size, size, 3), dtype=np.float32)
    for c in range(3):
        channel = Image.fromarray(np.ascontiguousarray(image[:, :, c], dtype=np.float32))
        resized = channel.resize((size, size), resample=Image.Resampling.BICUBIC)
        out[:, :, c] = np.asarray(resized, dtype=np.float32)
    np.clip(out, 0.0, 255.0, out=out)
    return out


def _path_key(relpath: str) -> int:
    return int.from_bytes(hashlib.sha256(relpath.encode("utf-8")).digest()[:8], "little")


def crop_boxes(relpath: str, width: int, height: int, crop: int, n: int, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` int array of (left, top) corners of random ``crop x crop`` windows.

    Corners are uniform over every position that keeps the window inside the image, so together the
    windows can reach every pixel.  The draw depends only on ``(seed, relpath, width, height, crop,
    n)`` -- not on file order, batching or worker processes.
    """
    if crop < 1 or n < 1:
        raise ValueError("crop and n must be positive")
    if width < crop or height < crop:
        raise EvalError(f"{relpath}: image {width}x{height} is smaller than the {crop}x{crop} crop")
    rng = np.random.default_rng([int(seed), _path_key(relpath)])
    lefts = rng.integers(0, width - crop + 1, size=n)
    tops = rng.integers(0, height - crop + 1, size=n)
    return np.stack([lefts, tops], axis=1).astype(np.int64)


def native_crops(image: np.ndarray, relpath: str, crop: int, n: int, seed: int = 0) -> np.ndarray:
    """``(n, 299, 299, 3)`` float32 crops taken at native resolution (clean-resized if crop != 299)."""
    h, w = image.shape[:2]
    boxes = crop_boxes(relpath, w, h, crop, n, seed)
    out = np.empty((n, INPUT_SIZE, INPUT_SIZE, 3), dtype=np.float32)
    for i, (left, top) in enumerate(boxes):
        patch = image[top:top + crop, left:left + crop]
        out[i] = patch if crop == INPUT_SIZE else clean_resize(patch)
    return out


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
@dataclass
class FeatureSettings:
    """What to extract: native-resolution crop size / count and the seed of the crop draws."""

    crop: int = INPUT_SIZE
    crops_per_image: int = 1
    seed: int = 0

    def key_for(self, kind: str) -> Dict[str, object]:
        d: Dict[str, object] = {"kind": kind, "resize": RESIZE_ID, "input_size": INPUT_SIZE}
        if kind == "patch_pool3":
            d.update(crop=self.crop, crops_per_image=self.crops_per_image, seed=self.seed)
        return d


class _FolderImages(torch.utils.data.Dataset):
    def __init__(self, root: str, relpaths: Sequence[str], want_full: bool,
                 settings: Optional[FeatureSettings]):
        self.root = root
        self.relpaths = list(relpaths)
        self.want_full = want_full
        self.settings = settings

    def __len__(self):
        return len(self.relpaths)

    def __getitem__(self, i):
        rel = self.relpaths[i]
        empty = torch.empty(0)
        try:
            img = load_rgb(os.path.join(self.root, rel))
            full = torch.from_numpy(clean_resize(img)).permute(2, 0, 1) if self.want_full else empty
            if self.settings is not None:
                s = self.settings
                crops = torch.from_numpy(native_crops(img, rel, s.crop, s.crops_per_image, s.seed))
                crops = crops.permute(0, 3, 1, 2)
            else:
                crops = empty
        except EvalError as e:
            return i, empty, empty, str(e)
        except Exception as e:  # truncated / corrupt file: reported, not fatal
            return i, empty, empty, f"{type(e).__name__}: {e}"
        return i, full, crops, ""


def _collate(items):
    idx = [it[0] for it in items if not it[3]]
    fulls = [it[1] for it in items if not it[3] and it[1].numel()]
    crops = [it[2] for it in items if not it[3] and it[2].numel()]
    errors = [(it[0], it[3]) for it in items if it[3]]
    return (
        idx,
        torch.stack(fulls) if fulls else None,
        torch.cat(crops) if crops else None,
        errors,
    )


@contextlib.contextmanager
def _exact_fp32():
    """Disable TF32 so features on Ampere+ GPUs are plain float32 (as on CPU)."""
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _few(items, k=5) -> str:
    items = list(items)
    s = "; ".join(str(x) for x in items[:k])
    return s + (f"; ... (+{len(items) - k} more)" if len(items) > k else "")


@dataclass
class FolderFeatures:
    """Features of one folder plus what was read and skipped."""

    folder: str
    features: Dict[str, np.ndarray]
    n_files: int
    n_images: int
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    sizes: Dict[str, int] = field(default_factory=dict)
    cached: Dict[str, bool] = field(default_factory=dict)
    fingerprint: str = ""

    def summary(self) -> Dict[str, object]:
        d = {"files": self.n_files, "images": self.n_images, "skipped": len(self.skipped)}
        if "patch_pool3" in self.features:
            d["patches"] = int(self.features["patch_pool3"].shape[0])
        return d


def _scan(root: str, relpaths: Sequence[str]):
    infos, bad = [], []
    for rel in relpaths:
        try:
            w, h = image_size(os.path.join(root, rel))  # as load_rgb returns it (EXIF orientation)
            infos.append((rel, w, h))
        except Exception as e:
            bad.append((rel, f"{type(e).__name__}: {e}"))
    return infos, bad


def _warn_mixed_sizes(root, sizes: Dict[str, int], kinds) -> None:
    if len(sizes) <= 1:
        return
    sizes = collections.Counter(sizes)
    common = ", ".join(f"{s} x{c}" for s, c in sizes.most_common(4))
    extra = "" if "patch_pool3" not in kinds else (
        "; native-resolution crops (pFID/pKID) then mix image scales")
    warnings.warn(
        f"{root}: images have {len(sizes)} different sizes ({common}{', ...' if len(sizes) > 4 else ''}); "
        f"each is resized to {INPUT_SIZE}x{INPUT_SIZE} for FID/KID/sFID/sKID{extra}",
        EvalWarning, stacklevel=3)


def _report_skipped(folder, skipped, strict):
    if not skipped:
        return
    msg = f"{folder}: {len(skipped)} unreadable image file(s): " + _few(f"{r} ({e})" for r, e in skipped)
    if strict:
        raise EvalError(msg)
    warnings.warn(msg + " -- skipped", EvalWarning, stacklevel=3)


def extract_features(
    folder,
    model: torch.nn.Module,
    kinds: Sequence[str],
    settings: Optional[FeatureSettings] = None,
    device=None,
    batch_size: int = 50,
    num_workers: int = 0,
    progress: bool = True,
    strict: bool = False,
    desc: Optional[str] = None,
    relpaths: Optional[Sequence[str]] = None,
) -> FolderFeatures:
    """Stream ``folder`` through ``model`` and return the requested feature kinds (no caching)."""
    kinds = tuple(dict.fromkeys(kinds))
    bad_kinds = set(kinds) - set(FEATURE_KINDS)
    if bad_kinds:
        raise ValueError(f"unknown feature kinds {sorted(bad_kinds)}; choose from {FEATURE_KINDS}")
    settings = settings or FeatureSettings()
    root = str(folder)
    if relpaths is None:
        relpaths = list_image_files(root)
    if not relpaths:
        raise EvalError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {root}")
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)

    infos, skipped = _scan(root, relpaths)
    _report_skipped(root, skipped, strict)
    if not infos:
        raise EvalError(f"{root}: none of the {len(relpaths)} image files could be read")
    sizes = collections.Counter(f"{w}x{h}" for _, w, h in infos)
    _warn_mixed_sizes(root, sizes, kinds)
    if "patch_pool3" in kinds:
        small = [(r, w, h) for r, w, h in infos if w < settings.crop or h < settings.crop]
        if small:
            raise EvalError(
                f"{root}: {len(small)} image(s) are smaller than the {settings.crop}x{settings.crop} crop used "
                "for pFID/pKID: " + _few(f"{r} ({w}x{h})" for r, w, h in small)
                + " -- use a smaller --crop or drop pfid/pkid")

    want_full = "pool3" in kinds or "spatial" in kinds
    want_crops = "patch_pool3" in kinds
    full_outputs = tuple(k for k in ("pool3", "spatial") if k in kinds)
    ok_rel = [r for r, _, _ in infos]
    dataset = _FolderImages(root, ok_rel, want_full, settings if want_crops else None)
    rows_per_image = (1 if want_full else 0) + (settings.crops_per_image if want_crops else 0)
    per_batch = max(1, batch_size // max(1, rows_per_image))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=per_batch, shuffle=False, num_workers=num_workers,
        collate_fn=_collate, pin_memory=device.type == "cuda")
    chunks: Dict[str, List[np.ndarray]] = {k: [] for k in kinds}
    n_ok = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(dataset), desc=desc or f"features {Path(root).name}", unit="img")
    try:
        with torch.inference_mode(), _exact_fp32():
            for idx, full, crops, errors in loader:
                for i, err in errors:
                    skipped.append((ok_rel[i], err))
                n_ok += len(idx)
                if bar is not None:
                    bar.update(len(idx) + len(errors))
                # whole images and crops share forwards: rows [0, n_full) are whole images
                n_full = full.shape[0] if (full is not None and full_outputs) else 0
                parts = ([full] if n_full else []) + ([crops] if crops is not None and want_crops else [])
                if not parts:
                    continue
                x = torch.cat(parts) if len(parts) > 1 else parts[0]
                outputs = tuple(dict.fromkeys(full_outputs + (("pool3",) if want_crops else ())))
                for s in range(0, x.shape[0], batch_size):
                    out = model(x[s:s + batch_size].to(device, non_blocking=True), outputs=outputs)
                    out = {k: v.float().cpu().numpy() for k, v in out.items()}
                    nf = min(max(n_full - s, 0), x[s:s + batch_size].shape[0])
                    if nf:
                        for k in full_outputs:
                            chunks[k].append(out[k][:nf])
                    if want_crops and nf < len(out["pool3"]):
                        chunks["patch_pool3"].append(out["pool3"][nf:])
    finally:
        if bar is not None:
            bar.close()
    ok_set = set(ok_rel)
    late = [s for s in skipped if s[0] in ok_set]
    if late:
        _report_skipped(root, late, strict)
    if n_ok == 0:
        raise EvalError(f"{root}: none of the {len(relpaths)} image files could be decoded")
    feats = {k: np.concatenate(v, axis=0) if v else np.zeros((0, 0), np.float32) for k, v in chunks.items()}
    return FolderFeatures(folder=root, features=feats, n_files=len(relpaths), n_images=n_ok,
                          skipped=skipped, sizes=dict(sizes), cached={k: False for k in kinds})


# --------------------------------------------------------------------------------------------
# caching
# --------------------------------------------------------------------------------------------
def default_cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "scalecrafter_eval"


def cache_key(fingerprint: str, kind: str, settings: FeatureSettings, extractor_sha256: str) -> str:
    payload = {"version": CACHE_VERSION, "fingerprint": fingerprint, "extractor": extractor_sha256}
    payload.update(settings.key_for(kind))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]


def _load_cached(cache_dir: Path, key: str):
    npy, meta = cache_dir / f"{key}.npy", cache_dir / f"{key}.json"
    if not (npy.is_file() and meta.is_file()):
        return None
    try:
        info = json.loads(meta.read_text())
        arr = np.load(npy, allow_pickle=False)
        if arr.ndim != 2 or arr.shape[0] != info["rows"]:
            return None
        return arr, info
    except Exception:
        return None


def _store_cached(cache_dir: Path, key: str, arr: np.ndarray, info: Dict[str, object]) -> None:
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.{os.getpid()}.tmp.npy"
    np.save(tmp, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
    os.replace(tmp, cache_dir / f"{key}.npy")
    tmpj = cache_dir / f".{key}.{os.getpid()}.tmp.json"
    tmpj.write_text(json.dumps(dict(info, rows=int(arr.shape[0])), indent=1))
    os.replace(tmpj, cache_dir / f"{key}.json")


def folder_features(
    folder,
    model: torch.nn.Module,
    extractor_sha256: str,
    kinds: Sequence[str],
    settings: Optional[FeatureSettings] = None,
    cache_dir=None,
    use_cache: bool = True,
    **kwargs,
) -> FolderFeatures:
    """:func:`extract_features` with an on-disk cache per feature kind.

    The cache key combines the folder listing (relative paths, sizes, mtimes), the feature kind and
    its settings, and the sha256 of the Inception weights; only missing kinds are recomputed, in a
    single pass over the images.
    """
    settings = settings or FeatureSettings()
    kinds = tuple(dict.fromkeys(kinds))
    root = str(folder)
    relpaths = list_image_files(root)
    if not relpaths:
        raise EvalError(f"no images ({'/'.join(e[1:] for e in IMAGE_EXTENSIONS)}) found under {root}")
    fp = folder_fingerprint(root, relpaths)
    cdir = Path(cache_dir) if cache_dir else default_cache_dir()
    found: Dict[str, Tuple[np.ndarray, Dict[str, object]]] = {}
    if use_cache:
        for k in kinds:
            hit = _load_cached(cdir, cache_key(fp, k, settings, extractor_sha256))
            if hit is not None:
                found[k] = hit
    todo = [k for k in kinds if k not in found]
    if todo:
        res = extract_features(root, model, todo, settings, relpaths=relpaths, **kwargs)
        res.fingerprint = fp
        if use_cache:
            for k in todo:
                info = {"folder": os.path.abspath(root), "kind": k, "n_files": res.n_files,
                        "n_images": res.n_images, "skipped": res.skipped, "sizes": res.sizes,
                        "settings": settings.key_for(k), "extractor_sha256": extractor_sha256,
                        "created": time.strftime("%Y-%m-%d %H:%M:%S")}
                try:
                    _store_cached(cdir, cache_key(fp, k, settings, extractor_sha256), res.features[k], info)
                except OSError as e:
                    warnings.warn(f"could not write feature cache in {cdir}: {e}", EvalWarning, stacklevel=2)
    else:
        info = next(iter(found.values()))[1]
        res = FolderFeatures(folder=root, features={}, n_files=int(info["n_files"]),
                             n_images=int(info["n_images"]),
                             skipped=[tuple(s) for s in info.get("skipped", [])],
                             sizes=dict(info.get("sizes", {})), fingerprint=fp)
        if res.skipped:
            msg = (f"{root}: {len(res.skipped)} unreadable image file(s) were skipped (cached result): "
                   + _few(f"{r} ({e})" for r, e in res.skipped))
            if kwargs.get("strict"):
                raise EvalError(msg)
            warnings.warn(msg, EvalWarning, stacklevel=2)
        _warn_mixed_sizes(root, res.sizes, kinds)
    for k, (arr, _) in found.items():
        res.features[k] = arr
    res.cached = {k: k in found for k in kinds}
    return res


__all__ = [
    "IMAGE_EXTENSIONS",
    "FEATURE_KINDS",
    "FeatureSettings",
    "FolderFeatures",
    "list_image_files",
    "folder_fingerprint",
    "load_rgb",
    "clean_resize",
    "crop_boxes",
    "native_crops",
    "extract_features",
    "folder_features",
    "default_cache_dir",
    "cache_key",
]
