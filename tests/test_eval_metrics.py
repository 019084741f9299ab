"""FID/KID maths, clean resize, crops and the FID Inception network (ldm.evaluation).

The metric values are checked against the independent implementations shipped with clean-fid and
torchmetrics on fixed random feature sets; the network against pytorch-fid's FID Inception as
bundled in clean-fid (torchvision Inception3 with the FID blocks), loaded with the same random
weights.  No real weights or images are needed.
"""
import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from ldm.evaluation import features as F_
from ldm.evaluation import inception as I_
from ldm.evaluation import metrics as M

cleanfid_fid = pytest.importorskip("cleanfid.fid")
cleanfid_resize = pytest.importorskip("cleanfid.resize")
tm_fid = pytest.importorskip("torchmetrics.image.fid")
tm_kid = pytest.importorskip("torchmetrics.image.kid")

REL = 1e-6


def _features(seed, n, d, shift=0.0, mix=0.0):
    rng = np.random.default_rng(seed)
    base = np.random.default_rng(1234).normal(size=(d, d)) / np.sqrt(d)
    a = base + mix * rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ a + shift


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def randomize_inception(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights that keep activations O(1) through the network (unlike the default init + identity BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Conv2d):
                fan_in = mod.weight[0].numel()
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * (2.0 / fan_in) ** 0.5)
            elif isinstance(mod, nn.BatchNorm2d):
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.bias.shape, generator=g) - 0.5)
                mod.running_mean.copy_((torch.rand(mod.running_mean.shape, generator=g) - 0.5) * 0.2)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=g) + 0.5)
            elif isinstance(mod, nn.Linear):
                mod.weight.copy_(torch.randn(mod.weight.shape, generator=g) * 0.02)
                mod.bias.zero_()
    return model


@pytest.fixture(scope="module")
def random_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "random_fid_inception.pth"
    model = randomize_inception(I_.FIDInceptionV3(), seed=0)
    torch.save(model.state_dict(), path)
    return path


# ------------------------------------------------------------------------------------------
# FID
# ------------------------------------------------------------------------------------------
def test_frechet_distance_matches_cleanfid_and_torchmetrics():
    f1 = _features(0, 600, 48)
    f2 = _features(1, 700, 48, shift=0.2, mix=0.3)
    mu1, s1 = M.feature_statistics(f1)
    mu2, s2 = M.feature_statistics(f2)
    np.testing.assert_allclose(s1, np.cov(f1, rowvar=False), rtol=1e-12, atol=1e-12)
    ours = M.frechet_distance(mu1, s1, mu2, s2)
    ref_cf = float(cleanfid_fid.frechet_distance(mu1, s1, mu2, s2))
    ref_tm = float(tm_fid._compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert ours > 1.0
    assert _rel(ours, ref_cf) < REL
    assert _rel(ours, ref_tm) < REL
    # the feature-level entry point, both routes
    assert _rel(M.fid_from_features(f1, f2), float(cleanfid_fid.fid_from_feats(f1, f2))) < REL
    assert _rel(M.fid_from_features(f1, f2, method="lowrank"), ref_cf) < REL


def test_fid_identical_sets_is_zero_and_symmetric():
    f1 = _features(3, 300, 16)
    f2 = _features(4, 300, 16, shift=0.5)
    assert abs(M.fid_from_features(f1, f1)) < 1e-8
    assert _rel(M.fid_from_features(f1, f2), M.fid_from_features(f2, f1)) < 1e-9


def test_fid_fewer_samples_than_dims_lowrank_route():
    # rank-deficient covariances: the N1 x N2 SVD route must equal the d x d route
    f1 = _features(5, 40, 96)
    f2 = _features(6, 50, 96, shift=0.3, mix=0.5)
    with pytest.warns(M.EvalWarning, match="covariance is singular"):
        low = M.fid_from_features(f1, f2, method="lowrank")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full = M.fid_from_features(f1, f2, method="covariance")
        mu1, s1 = M.feature_statistics(f1)
        mu2, s2 = M.feature_statistics(f2)
    ref_tm = float(tm_fid._compute_fid(*(torch.from_numpy(a) for a in (mu1, s1, mu2, s2))))
    assert _rel(low, full) < REL
    assert _rel(low, ref_tm) < 1e-5  # eigvals of a singular non-symmetric product: slightly noisier


def test_fid_needs_two_samples():
    with pytest.raises(M.EvalError, match="at least 2"):
        M.fid_from_features(np.zeros((1, 8)), np.zeros((5, 8)))
    with pytest.raises(M.EvalError, match="same d"):
        M.fid_from_features(np.zeros((5, 8)), np.zeros((5, 9)))


# ------------------------------------------------------------------------------------------
# KID
# ------------------------------------------------------------------------------------------
def test_kid_full_set_matches_cleanfid_and_torchmetrics():
    f1 = _features(7, 400, 64)
    f2 = _features(8, 400, 64, shift=0.1, mix=0.2)
    ours = M.kernel_inception_distance(f1, f2, num_subsets=100, subset_size=400)
    assert ours.num_subsets == 1 and ours.subset_size == 400 and ours.std == 0.0
    np.random.seed(0)
    ref_cf = cleanfid_fid.kernel_distance(f1, f2, num_subsets=1, max_subset_size=400)
    ref_tm = float(tm_kid.poly_mmd(torch.from_numpy(f1), torch.from_numpy(f2), degree=3, gamma=None, coef=1.0))
    assert ours.mean > 0
    assert _rel(ours.mean, ref_cf) < REL
    assert _rel(ours.mean, ref_tm) < REL
    assert _rel(M.mmd2_unbiased(f1, f2), ref_tm) < REL


def test_kid_subset_average_matches_cleanfid_draws():
    f1 = _features(9, 150, 32)
    f2 = _features(10, 120, 32, shift=0.2)
    m, k = 50, 20
    np.random.seed(123)
    ref = cleanfid_fid.kernel_distance(f1, f2, num_subsets=k, max_subset_size=m)
    # same index draws as clean-fid (x from the second set, then y from the first, per subset)
    np.random.seed(123)
    vals = []
    for _ in range(k):
        ix = np.random.choice(len(f2), m, replace=False)
        iy = np.random.choice(len(f1), m, replace=False)
        vals.append(M.mmd2_unbiased(f1[iy], f2[ix]))
    assert _rel(float(np.mean(vals)), ref) < REL
    # our own subset sampler: seeded, reproducible, k subsets of m
    a = M.kernel_inception_distance(f1, f2, num_subsets=k, subset_size=m, seed=5)
    b = M.kernel_inception_distance(f1, f2, num_subsets=k, subset_size=m, seed=5)
    assert (a.mean, a.std) == (b.mean, b.std) and a.num_subsets == k and a.subset_size == m and a.std > 0


def test_kid_smaller_sets_than_subset_size_warn():
    f1 = _features(11, 60, 16)
    f2 = _features(12, 80, 16)
    with pytest.warns(M.EvalWarning, match="subset size reduced from 1000 to 60"):
        res = M.kernel_inception_distance(f1, f2)
    assert res.subset_size == 60 and res.num_subsets == 100 and np.isfinite(res.mean)
    with pytest.raises(M.EvalError, match="at least 2"):
        M.kernel_inception_distance(f1[:1], f2)


# ------------------------------------------------------------------------------------------
# clean resize and crops
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(97, 131), (400, 350), (299, 299)])
def test_clean_resize_matches_cleanfid(shape):
    rng = np.random.default_rng(shape[0])
    img = rng.integers(0, 256, size=shape + (3,), dtype=np.uint8)
    ours = F_.clean_resize(img)
    ref = cleanfid_resize.build_resizer("clean")(img)
    assert ours.dtype == np.float32 and ours.shape == (299, 299, 3)
    np.testing.assert_array_equal(ours, ref)
    # float, not re-quantised
    if shape != (299, 299):
        assert np.any(ours != np.round(ours))


def test_crop_boxes_deterministic_in_bounds_and_covering():
    w, h, c, n = 96, 80, 64, 5000
    a = F_.crop_boxes("sub/img_001.png", w, h, c, n, seed=0)
    b = F_.crop_boxes("sub/img_001.png", w, h, c, n, seed=0)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, F_.crop_boxes("sub/img_002.png", w, h, c, n, seed=0))
    assert not np.array_equal(a, F_.crop_boxes("sub/img_001.png", w, h, c, n, seed=1))
    # order independence: drawing other files first does not change this file's crops
    F_.crop_boxes("other.png", w, h, c, 7, seed=0)
    np.testing.assert_array_equal(a, F_.crop_boxes("sub/img_001.png", w, h, c, n, seed=0))
    lefts, tops = a[:, 0], a[:, 1]
    assert lefts.min() == 0 and lefts.max() == w - c
    assert tops.min() == 0 and tops.max() == h - c
    covered = np.zeros((h, w), bool)
    for left, top in a:
        covered[top:top + c, left:left + c] = True
    assert covered.all()
    # every possible offset is reachable
    assert set(lefts.tolist()) == set(range(w - c + 1))
    # a crop exactly the image size is the whole image
    np.testing.assert_array_equal(F_.crop_boxes("x.png", c, c, c, 3), np.zeros((3, 2)))
    with pytest.raises(M.EvalError, match="smaller than the 128x128 crop"):
        F_.crop_boxes("x.png", w, h, 128, 1)


def test_native_crops_are_image_windows():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(320, 310, 3), dtype=np.uint8)
    crops = F_.native_crops(img, "a.png", 299, 3, seed=4)
    boxes = F_.crop_boxes("a.png", 310, 320, 299, 3, seed=4)
    for crop, (left, top) in zip(crops, boxes):
        np.testing.assert_array_equal(crop, img[top:top + 299, left:left + 299].astype(np.float32))
    small = F_.native_crops(img, "a.png", 64, 2, seed=4)
    left, top = F_.crop_boxes("a.png", 310, 320, 64, 2, seed=4)[0]
    np.testing.assert_array_equal(small[0], F_.clean_resize(img[top:top + 64, left:left + 64]))


def test_list_image_files_nested(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / ".hidden").mkdir()
    for p in ["x.png", "a/y.JPG", "a/b/z.jpeg", "notes.txt", ".hidden/q.png", "a/.w.png"]:
        (tmp_path / p).write_bytes(b"")
    assert F_.list_image_files(tmp_path) == ["a/b/z.jpeg", "a/y.JPG", "x.png"]
    with pytest.raises(M.EvalError, match="not a folder"):
        F_.list_image_files(tmp_path / "missing")


# ------------------------------------------------------------------------------------------
# Inception network and weights
# ------------------------------------------------------------------------------------------
def _standard_layout():
    torchvision = pytest.importorskip("torchvision")
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False)
    net.fc = nn.Linear(2048, 1008)
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def test_state_dict_layout_matches_standard_fid_inception():
    ours = [(k, tuple(v.shape)) for k, v in I_.FIDInceptionV3().state_dict().items()]
    assert ours == _standard_layout()
    assert len(ours) == 566
    assert I_.expected_state_dict_layout()["fc.weight"] == (1008, 2048)
    assert not any(k.startswith("AuxLogits") for k, _ in ours)


def test_network_matches_pytorch_fid_inception(random_weights, monkeypatch):
    """Same weights in pytorch-fid's FID Inception (bundled with clean-fid): same pool3/spatial/logits."""
    ip = pytest.importorskip("cleanfid.inception_pytorch")
    sd = torch.load(random_weights, weights_only=True)
    monkeypatch.setattr(ip, "load_state_dict_from_url", lambda *a, **k: sd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = ip.fid_inception_v3().eval()  # strict load: also validates the layout
    grabbed = {}
    ref.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: grabbed.__setitem__("sp", o))
    ref.avgpool.register_forward_hook(lambda m, i, o: grabbed.__setitem__("pool", o))

    model, ident = I_.load_fid_inception(random_weights)
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0)) * 255
    with torch.inference_mode():
        ours = model(x, outputs=("pool3", "spatial", "logits"))
        logits = ref((x - 128) / 128)
    pool = grabbed["pool"].flatten(1)
    sp = grabbed["sp"][:, :7].permute(0, 2, 3, 1).reshape(1, -1)
    assert ours["pool3"].shape == (1, 2048) and ours["spatial"].shape == (1, 2023)
    assert float(pool.std()) > 1e-2  # non-degenerate random network
    torch.testing.assert_close(ours["pool3"], pool, rtol=1e-4, atol=1e-4 * float(pool.abs().max()))
    torch.testing.assert_close(ours["spatial"], sp, rtol=1e-4, atol=1e-4 * float(sp.abs().max()))
    torch.testing.assert_close(ours["logits"], logits, rtol=1e-4, atol=1e-4 * float(logits.abs().max()))
    assert ident["sha256"] == hashlib.sha256(random_weights.read_bytes()).hexdigest()
    assert ident["sha256_matches_standard_name"] is False
    with pytest.raises(ValueError, match="299"):
        model(torch.zeros(1, 3, 64, 64))


def test_weights_without_bn_counters_and_with_wrapper_load(tmp_path, random_weights):
    sd = torch.load(random_weights, weights_only=True)
    stripped = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    p = tmp_path / "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity style, no BN counters
    torch.save(stripped, p)
    model, _ = I_.load_fid_inception(p)
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, sd["Mixed_7c.branch_pool.conv.weight"])
    q = tmp_path / "wrapped.pth"
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}}, q)
    I_.load_fid_inception(q)


def test_wrong_layout_is_a_clear_error(tmp_path, random_weights):
    sd = torch.load(random_weights, weights_only=True)
    sd.pop("Mixed_7c.branch_pool.conv.weight")
    sd["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    sd["fc.weight"] = torch.zeros(1000, 2048)
    p = tmp_path / "bad.pth"
    torch.save(sd, p)
    with pytest.raises(I_.InceptionWeightsError) as e:
        I_.load_fid_inception(p)
    msg = str(e.value)
    assert "missing keys: Mixed_7c.branch_pool.conv.weight" in msg
    assert "unexpected keys: AuxLogits.fc.weight" in msg
    assert "fc.weight (1000, 2048) != (1008, 2048)" in msg
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(I_.InceptionWeightsError, match="could not read"):
        I_.load_fid_inception(junk)


def test_missing_weights_message(tmp_path, monkeypatch, random_weights):
    monkeypatch.delenv(I_.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(I_.InceptionWeightsError) as e:
        I_.resolve_weights_path()
    msg = str(e.value)
    assert "pt_inception-2015-12-05-6726825d.pth" in msg
    assert "FID_INCEPTION_WEIGHTS" in msg and "--inception_weights" in msg
    assert "~/.cache/torch/hub/checkpoints" in msg
    assert str(tmp_path / "torch_home" / "hub" / "checkpoints") in msg
    with pytest.raises(I_.InceptionWeightsError, match="does not exist: /nope.pth"):
        I_.resolve_weights_path("/nope.pth")
    # environment variable and the torch hub cache are honoured
    monkeypatch.setenv(I_.WEIGHTS_ENV, str(random_weights))
    assert I_.resolve_weights_path() == random_weights
    monkeypatch.delenv(I_.WEIGHTS_ENV)
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / "pt_inception-2015-12-05-6726825d.pth").write_bytes(b"")
    assert I_.resolve_weights_path() == hub / "pt_inception-2015-12-05-6726825d.pth"
