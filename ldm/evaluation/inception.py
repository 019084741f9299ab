"""The FID Inception-v3 feature extractor (TensorFlow ``inception-2015-12-05`` graph, PyTorch layout).

FID, KID and their patch/spatial variants are only comparable across papers when they are computed
with the very network of Heusel et al. (2017): the Inception-v3 graph TensorFlow published on
2015-12-05 (``classify_image_graph_def.pb``).  pytorch-fid, torch-fidelity and clean-fid all use a
port of that graph.  This module rebuilds it in PyTorch with the module names of
``torchvision.models.Inception3`` (``Conv2d_1a_3x3`` ... ``Mixed_7c``, ``fc``), so that the state dict
of pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` loads into it unchanged.

Where the TF graph differs from torchvision's ImageNet Inception-v3, the graph wins:

* the average pools inside the 35x35 blocks (``Mixed_5b-d``), the 17x17 blocks (``Mixed_6b-e``) and
  ``Mixed_7b`` ignore the zero padding when averaging (TF ``SAME`` padding);
* the pooling branch of ``Mixed_7c`` is a 3x3 *max* pool;
* the classifier has 1008 outputs and no auxiliary head;
* inputs in [0, 255] are normalised as ``(x - 128) / 128`` (the graph's own ``Sub``/``Mul`` nodes).

Outputs (for 299x299 inputs):

* ``pool3``: the 2048-d global average pool after ``Mixed_7c`` (TF ``pool_3:0``), used by FID/KID;
* ``spatial``: the first 7 channels of TF ``mixed_6/conv:0`` -- the ReLU output of the 1x1 branch
  of the fourth 17x17 block (``Mixed_6d.branch1x1``) -- flattened in TF's NHWC order to
  17*17*7 = 2023 values, as in the sFID of Nash et al. (2021);
* ``logits``: the 1008-way classifier output (unused by the metrics).

No weights are ever downloaded: :func:`load_fid_inception` reads a local file given explicitly, via
``$FID_INCEPTION_WEIGHTS``, or from the places where pytorch-fid / torch-fidelity cache it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_ENV = "FID_INCEPTION_WEIGHTS"
#: file names under which the standard weights are distributed (pytorch-fid, torch-fidelity)
STANDARD_WEIGHT_FILES = (
    "pt_inception-2015-12-05-6726825d.pth",
    "weights-inception-2015-12-05-6726825d.pth",
)
STANDARD_WEIGHTS_URL = (
    "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
    "pt_inception-2015-12-05-6726825d.pth"
)
#: hash fragment carried by the standard file name (torch.hub convention: sha256 prefix)
STANDARD_HASH_PREFIX = "6726825d"
EXTRACTOR_NAME = "fid-inception-v3-tf-2015-12-05"

INPUT_SIZE = 299
POOL3_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_CLASSES = 1008
FEATURE_NAMES = ("pool3", "spatial", "logits")


class InceptionWeightsError(FileNotFoundError):
    """The FID Inception weights file is missing or is not in the expected layout."""


# --------------------------------------------------------------------------------------------
# network
# --------------------------------------------------------------------------------------------
class ConvBNReLU(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3 as in the TF graph), ReLU."""

    def __init__(self, cin: int, cout: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):
    # 3x3/1 average with SAME padding where padded positions do not count (TF semantics)
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class Block35(nn.Module):
    """35x35 block (TF ``mixed``, ``mixed_1``, ``mixed_2``)."""

    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 64, 1)
        self.branch5x5_1 = ConvBNReLU(cin, 48, 1)
        self.branch5x5_2 = ConvBNReLU(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, padding=1)
        self.branch_pool = ConvBNReLU(cin, pool_features, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        b = self.branch5x5_2(self.branch5x5_1(x))
        c = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1)


class Reduction35to17(nn.Module):
    """Grid reduction 35x35 -> 17x17 (TF ``mixed_3``)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = ConvBNReLU(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBNReLU(cin, 64, 1)
        self.branch3x3dbl_2 = ConvBNReLU(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBNReLU(96, 96, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3(x)
        b = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class Block17(nn.Module):
    """17x17 block with factorised 7x7 convolutions (TF ``mixed_4`` ... ``mixed_7``)."""

    def __init__(self, cin: int, c7: int):
        super().__init__()
        self.branch1x1 = ConvBNReLU(cin, 192, 1)
        self.branch7x7_1 = ConvBNReLU(cin, c7, 1)
        self.branch7x7_2 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBNReLU(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBNReLU(cin, c7, 1)
        self.branch7x7dbl_2 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBNReLU(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBNReLU(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBNReLU(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBNReLU(cin, 192, 1)

    def forward_with_1x1(self, x):
        """Block output and the output of its 1x1 branch (TF ``mixed_k/conv``)."""
        a = self.branch1x1(x)
        b = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        c = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3,
                      self.branch7x7dbl_4, self.branch7x7dbl_5):
            c = layer(c)
        d = self.branch_pool(_avg3(x))
        return torch.cat([a, b, c, d], 1), a

    def forward(self, x):
        return self.forward_with_1x1(x)[0]


class Reduction17to8(nn.Module):
    """Grid reduction 17x17 -> 8x8 (TF ``mixed_8``)."""

    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = ConvBNReLU(cin, 192, 1)
        self.branch3x3_2 = ConvBNReLU(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBNReLU(cin, 192, 1)
        self.branch7x7x3_2 = ConvBNReLU(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBNReLU(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBNReLU(192, 192, 3, stride=2)

    def forward(self, x):
        a = self.branch3x3_2(self.branch3x3_1(x))
        b = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        c = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([a, b, c], 1)


class Block8(nn.Module):
    """8x8 block with split 1x3/3x1 convolutions (TF ``mixed_9``, ``mixed_10``).

    ``pool`` selects the pooling branch: "avg" (padding excluded) for ``mixed_9`` and "max" for
    ``mixed_10`` -- one of the places where the TF graph differs from torchvision's network.
    """

    def __init__(self, cin: int, pool: str):
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(pool)
        self.pool = pool
        self.branch1x1 = ConvBNReLU(cin, 320, 1)
        self.branch3x3_1 = ConvBNReLU(cin, 384, 1)
        self.branch3x3_2a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBNReLU(cin, 448, 1)
        self.branch3x3dbl_2 = ConvBNReLU(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBNReLU(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBNReLU(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBNReLU(cin, 192, 1)

    def forward(self, x):
        a = self.branch1x1(x)
        t = self.branch3x3_1(x)
        b = torch.cat([self.branch3x3_2a(t), self.branch3x3_2b(t)], 1)
        u = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        c = torch.cat([self.branch3x3dbl_3a(u), self.branch3x3dbl_3b(u)], 1)
        if self.pool == "avg":
            p = _avg3(x)
        else:
            p = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        d = self.branch_pool(p)
        return torch.cat([a, b, c, d], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in TensorFlow's 2015-12-05 graph, with torchvision module names.

    ``forward(x, outputs=("pool3",))`` takes a float batch ``(B, 3, 299, 299)`` with values in
    [0, 255] (RGB, already resized) and returns a dict with the requested entries of
    :data:`FEATURE_NAMES`.
    """

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBNReLU(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBNReLU(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBNReLU(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBNReLU(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBNReLU(80, 192, 3)
        self.Mixed_5b = Block35(192, pool_features=32)
        self.Mixed_5c = Block35(256, pool_features=64)
        self.Mixed_5d = Block35(288, pool_features=64)
        self.Mixed_6a = Reduction35to17(288)
        self.Mixed_6b = Block17(768, c7=128)
        self.Mixed_6c = Block17(768, c7=160)
        self.Mixed_6d = Block17(768, c7=160)
        self.Mixed_6e = Block17(768, c7=192)
        self.Mixed_7a = Reduction17to8(768)
        self.Mixed_7b = Block8(1280, pool="avg")
        self.Mixed_7c = Block8(2048, pool="max")
        self.fc = nn.Linear(POOL3_DIM, NUM_CLASSES)

    def forward(self, x: torch.Tensor, outputs: Sequence[str] = ("pool3",)) -> Dict[str, torch.Tensor]:
        outputs = tuple(outputs)
        unknown = set(outputs) - set(FEATURE_NAMES)
        if unknown:
            raise ValueError(f"unknown outputs {sorted(unknown)}; choose from {FEATURE_NAMES}")
        if x.ndim != 4 or x.shape[1] != 3 or tuple(x.shape[2:]) != (INPUT_SIZE, INPUT_SIZE):
            raise ValueError(
                f"expected a (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) batch in [0, 255], got {tuple(x.shape)}; "
                "resize with ldm.evaluation.features.clean_resize first"
            )
        result: Dict[str, torch.Tensor] = {}
        x = (x - 128.0) / 128.0
        x = self.Conv2d_1a_3x3(x)
        x = self.Conv2d_2a_3x3(x)
        x = self.Conv2d_2b_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_3b_1x1(x)
        x = self.Conv2d_4a_3x3(x)
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Mixed_5b(x)
        x = self.Mixed_5c(x)
        x = self.Mixed_5d(x)
        x = self.Mixed_6a(x)
        x = self.Mixed_6b(x)
        x = self.Mixed_6c(x)
        x, mixed_6_conv = self.Mixed_6d.forward_with_1x1(x)
        if "spatial" in outputs:
            # TF keeps NHWC: flatten (17, 17, 7) in that order
            sp = mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)
            result["spatial"] = sp.reshape(sp.shape[0], -1)
            if len(outputs) == 1:
                return result
        x = self.Mixed_6e(x)
        x = self.Mixed_7a(x)
        x = self.Mixed_7b(x)
        x = self.Mixed_7c(x)
        pool3 = x.mean(dim=(2, 3))
        if "pool3" in outputs:
            result["pool3"] = pool3
        if "logits" in outputs:
            result["logits"] = self.fc(pool3)
        return result


# --------------------------------------------------------------------------------------------
# weights
# --------------------------------------------------------------------------------------------
def expected_state_dict_layout() -> Dict[str, Tuple[int, ...]]:
    """Key -> shape of the standard FID Inception state dict (BN ``num_batches_tracked`` included)."""
    return {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}


def candidate_weight_paths() -> List[Path]:
    """Places where users usually already have the standard file (pytorch-fid/torch-fidelity caches)."""
    dirs: List[Path] = []
    try:
        dirs.append(Path(torch.hub.get_dir()) / "checkpoints")
    except Exception:  # pragma: no cover - torch.hub misconfigured
        pass
    dirs.append(Path.home() / ".cache" / "torch" / "hub" / "checkpoints")
    dirs.append(Path("checkpoints"))
    seen, out = set(), []
    for d in dirs:
        for name in STANDARD_WEIGHT_FILES:
            p = (d / name).expanduser()
            if str(p) not in seen:
                seen.add(str(p))
                out.append(p)
    return out


def _missing_weights_message(tried: Iterable[Path], explicit: Optional[str]) -> str:
    lines = ["FID Inception weights not found."]
    if explicit:
        lines.append(f"  The given file does not exist: {explicit}")
    lines += [
        f"  Needed: {STANDARD_WEIGHT_FILES[0]} (~91 MB), pytorch-fid's PyTorch port of TensorFlow's",
        "  2015-12-05 Inception-v3 FID graph. torch-fidelity stores the same weights as",
        f"  {STANDARD_WEIGHT_FILES[1]}.",
        f"  Pass it with --inception_weights PATH or set ${WEIGHTS_ENV}=PATH.",
        "  Users who have run pytorch-fid or torch-fidelity usually have it in",
        "  ~/.cache/torch/hub/checkpoints/ (or $TORCH_HOME/hub/checkpoints/).",
        f"  It is published at {STANDARD_WEIGHTS_URL}; this tool never downloads it",
        "  (copy it from a machine with network access).",
    ]
    tried = list(tried)
    if tried:
        lines.append("  Looked in: " + ", ".join(str(p) for p in tried))
    return "\n".join(lines)


def resolve_weights_path(path: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The weights file to use: ``path``, else ``$FID_INCEPTION_WEIGHTS``, else a known cache location."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(_missing_weights_message([], str(path)))
        return p
    env = os.environ.get(WEIGHTS_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InceptionWeightsError(_missing_weights_message([], f"{env} (from ${WEIGHTS_ENV})"))
        return p
    tried = candidate_weight_paths()
    for p in tried:
        if p.is_file():
            return p
    raise InceptionWeightsError(_missing_weights_message(tried, None))


_SHA_CACHE: Dict[Tuple[str, int, int], str] = {}


def file_sha256(path: Union[str, os.PathLike]) -> str:
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _SHA_CACHE[key] = h.hexdigest()
    return _SHA_CACHE[key]


def _extract_state_dict(obj, path: Path) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise InceptionWeightsError(f"{path} does not hold a state dict (got {type(obj).__name__})")
    return obj


def check_state_dict(state_dict: Dict[str, torch.Tensor], source: str = "state dict") -> Dict[str, torch.Tensor]:
    """Validate against the FID Inception layout; return a dict ready for ``load_state_dict``.

    BatchNorm ``num_batches_tracked`` counters may be present or absent (pytorch-fid and
    torch-fidelity files differ there); everything else must match exactly.
    """
    layout = expected_state_dict_layout()
    sd = {}
    for k, v in state_dict.items():
        if k.startswith("module."):
            k = k[len("module."):]
        sd[k] = v
    required = {k for k in layout if not k.endswith("num_batches_tracked")}
    missing = sorted(required - set(sd))
    unexpected = sorted(k for k in sd if k not in layout)
    wrong = sorted(k for k in required & set(sd) if tuple(sd[k].shape) != layout[k])
    if missing or unexpected or wrong:
        def few(keys):
            return ", ".join(keys[:5]) + (f" (+{len(keys) - 5} more)" if len(keys) > 5 else "")
        parts = [f"{source} is not in the FID Inception-v3 layout ({STANDARD_WEIGHT_FILES[0]}):"]
        if missing:
            parts.append(f"  missing keys: {few(missing)}")
        if unexpected:
            parts.append(f"  unexpected keys: {few(unexpected)}")
        if wrong:
            parts.append("  wrong shapes: " + few([f"{k} {tuple(sd[k].shape)} != {layout[k]}" for k in wrong]))
        raise InceptionWeightsError("\n".join(parts))
    for k in layout:
        if k.endswith("num_batches_tracked") and k not in sd:
            sd[k] = torch.tensor(0, dtype=torch.long)
    return sd


def load_fid_inception(
    path: Optional[Union[str, os.PathLike]] = None,
    device: Union[str, torch.device] = "cpu",
) -> Tuple[FIDInceptionV3, Dict[str, object]]:
    """Build the network, load the local weights file and return ``(model.eval(), identity)``.

    ``identity`` records the extractor name, the file, its sha256 and whether the hash matches the
    fragment in the standard file name (``6726825d``); it is written into every result file.
    """
    p = resolve_weights_path(path)
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / not a torch file
        raise InceptionWeightsError(f"could not read FID Inception weights {p}: {e}") from e
    sd = check_state_dict(_extract_state_dict(obj, p), source=str(p))
    with torch.device("meta"):  # skip the random init; every tensor comes from the file
        model = FIDInceptionV3()
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in sd.items()},
                          strict=True, assign=True)
    model.eval().requires_grad_(False).to(device)
    sha = file_sha256(p)
    identity = {
        "name": EXTRACTOR_NAME,
        "weights_file": p.name,
        "weights_path": str(p.resolve()),
        "sha256": sha,
        "sha256_matches_standard_name": sha.startswith(STANDARD_HASH_PREFIX),
        "input": "RGB float in [0,255], (x-128)/128 inside the network, 299x299",
        "pool3_dim": POOL3_DIM,
        "spatial": "Mixed_6d.branch1x1 (TF mixed_6/conv) channels 0..6, NHWC-flattened, 2023-d",
    }
    return model, identity
