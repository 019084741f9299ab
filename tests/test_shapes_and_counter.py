"""The procedural shapes data and the object counter that the repetition demo relies on.

The counter is the demo's only measurement, so it is checked against ground truth it does not share
code with: the renderer's own masks, and images with a known number of shapes.
"""
import math

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from ldm.data.shapes import (
    CAPTIONS,
    COLOR_NAMES,
    SHAPES,
    VOCAB,
    ShapesDataset,
    background,
    finish,
    paint_shape,
    render_shape,
    sample_spec,
    shape_mask,
)
from ldm.evaluation.repetition import count_objects, format_table, summarize_counts, wilson_interval

EIGHT = np.ones((3, 3), dtype=bool)


def _upscale(img, factor, resample):
    h, w = img.shape[:2]
    return np.asarray(Image.fromarray(img).resize((w * factor, h * factor), resample))


def test_dataset_deterministic_and_ldm_style():
    a, b = ShapesDataset(size=32, seed=0), ShapesDataset(size=32, seed=0)
    x, y = a[7], b[7]
    assert np.array_equal(x["image"], y["image"]) and x["caption"] == y["caption"]
    assert not np.array_equal(a[7]["image"], a[8]["image"])
    assert not np.array_equal(a[7]["image"], ShapesDataset(size=32, seed=1)[7]["image"])
    img = x["image"]
    assert img.shape == (32, 32, 3) and img.dtype == np.float32
    assert -1.0 <= img.min() and img.max() <= 1.0
    assert CAPTIONS[x["label"]] == x["caption"]
    assert len(CAPTIONS) == len(SHAPES) * len(COLOR_NAMES) == 12
    assert set(" ".join(CAPTIONS).split()) == set(VOCAB)
    assert ShapesDataset(size=64)[0]["image"].shape == (64, 64, 3)


def test_every_image_has_one_object_and_the_counter_agrees():
    ds = ShapesDataset(size=32, seed=0)
    labels = set()
    for i in range(200):
        img, mask, spec = ds.render(i)
        labels.add(spec["label"])
        # independent ground truth: the renderer's own geometry
        _, n_true = ndimage.label(mask, structure=EIGHT)
        assert n_true == 1
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())
        assert 0.35 * 32 <= spec["size_px"] <= 0.65 * 32
        n, area, areas = count_objects(img)
        assert n == 1, (i, spec, areas)
        assert abs(area - mask.sum()) <= 0.3 * mask.sum(), (i, area, mask.sum())
    assert labels == set(range(12))


def _canvas_with(res, placements, seed):
    rng = np.random.default_rng(seed)
    canvas = background(res, rng)
    for shape, color, size, center in placements:
        paint_shape(canvas, shape, color, size, center)
    return finish(canvas, rng)


@pytest.mark.parametrize("res", [64, 128])
def test_counts_two_and_three_separated_shapes(res):
    s = res / 64.0
    d = 16 * s  # training-size copies at 64, twice that at 128
    two_same = [("circle", "red", d, (18 * s, 32 * s)), ("circle", "red", d, (46 * s, 32 * s))]
    two_mixed = [("square", "blue", d, (18 * s, 18 * s)), ("triangle", "yellow", d, (44 * s, 44 * s))]
    three_same = [
        ("square", "green", d, (16 * s, 16 * s)),
        ("square", "green", d, (46 * s, 18 * s)),
        ("square", "green", d, (30 * s, 46 * s)),
    ]
    three_mixed = [
        ("triangle", "red", d, (16 * s, 18 * s)),
        ("circle", "blue", d, (46 * s, 16 * s)),
        ("square", "yellow", d, (32 * s, 46 * s)),
    ]
    for seed, (placements, expected) in enumerate(
        [(two_same, 2), (two_mixed, 2), (three_same, 3), (three_mixed, 3)]
    ):
        img = _canvas_with(res, placements, seed)
        n, _, areas = count_objects(img)
        assert n == expected, (res, placements, areas)
    # small training-size copies (12 px, the smallest) at 128x128 must still count
    small = [("triangle", "green", 12, (30 + 34 * k, 30 + 34 * j)) for k in range(3) for j in range(3)]
    assert count_objects(_canvas_with(128, small, 9))[0] == 9


@pytest.mark.parametrize("res", [32, 64, 128])
def test_empty_background_and_noise_count_zero(res):
    rng = np.random.default_rng(res)
    assert count_objects(finish(background(res, rng), rng))[0] == 0
    for _ in range(5):
        # moderate per-channel Gaussian noise around mid grey: no giant "object", no specks
        noise = np.clip(rng.normal(128, 0.15 * 255, size=(res, res, 3)), 0, 255).astype(np.uint8)
        assert count_objects(noise)[0] == 0


@pytest.mark.parametrize("resample", [Image.BILINEAR, Image.BICUBIC])
def test_one_large_upscaled_shape_counts_one(resample):
    ds = ShapesDataset(size=32, seed=3)
    for i in range(12):
        big = _upscale(ds.render(i)[0], 4, resample)
        assert big.shape == (128, 128, 3)
        n, area, _ = count_objects(big)
        assert n == 1
        # area grows ~16x: what tells one enlarged object apart from repeated copies
        small_area = count_objects(ds.render(i)[0])[1]
        assert 10 * small_area <= area <= 22 * small_area


def test_render_shape_signature():
    img = render_shape("circle", "yellow", 16, (16, 16), 32, np.random.default_rng(0))
    assert img.dtype == np.uint8 and img.shape == (32, 32, 3)
    assert count_objects(img)[0] == 1
    assert shape_mask("circle", 16, (16, 16), 32).sum() == pytest.approx(math.pi * 64, rel=0.05)
    # the dataset's fast path draws and renders exactly like the public primitives
    img, mask, spec = ShapesDataset(size=32, seed=0).render(3)
    rng = np.random.default_rng([0, 3])
    assert sample_spec(rng, 32) == spec
    args = (spec["shape"], spec["color"], spec["size_px"], spec["center"], 32)
    assert np.array_equal(render_shape(*args, rng), img)
    assert np.array_equal(shape_mask(*[args[0], *args[2:]]), mask)


def test_wilson_interval_hand_computed():
    # z = 1.96: k = 0 of 40 -> upper = z^2 / (n + z^2) = 3.8415 / 43.8415
    lo, hi = wilson_interval(0, 40)
    assert lo == 0.0 and hi == pytest.approx(0.087622, abs=1e-5)
    # k = 20 of 40: centre 0.5, half = z/(1+z^2/n) * sqrt(0.25/40 + z^2/6400) = 0.148006
    lo, hi = wilson_interval(20, 40)
    assert lo == pytest.approx(0.351994, abs=1e-5) and hi == pytest.approx(0.648006, abs=1e-5)
    # k = 39 of 40: centre 0.933380, half 0.062193
    lo, hi = wilson_interval(39, 40)
    assert lo == pytest.approx(0.871187, abs=1e-5) and hi == pytest.approx(0.995573, abs=1e-5)


def test_summary_and_table():
    results = [(1, 100, [100]), (1, 120, [120]), (2, 200, [100, 100]), (0, 0, [])]
    s = summarize_counts(results, image_area=1000)
    assert (s["n"], s["n_one"], s["n_multi"], s["n_none"]) == (4, 2, 1, 1)
    assert s["share_one"] == 0.5 and s["share_multi"] == 0.25 and s["share_none"] == 0.25
    assert s["ci_one"] == wilson_interval(2, 4)
    assert s["mean_area_frac"] == pytest.approx(105 / 1000)
    assert summarize_counts([1, 2, 3])["mean_area_frac"] is None
    table = format_table([("native 32x32", s), ("64x64 direct", summarize_counts([2, 2, 1]))])
    lines = table.strip().splitlines()
    assert len(lines) == 4 and lines[0].startswith("| setting |")
    assert "0.500 [" in lines[2] and "| – |" in lines[3]
