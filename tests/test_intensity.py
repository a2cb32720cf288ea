"""Tests for mslpipe.intensity: the brain's normalisation and the flat field before it."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from test_preprocess import SHAPE, _ball, _head

from mslpipe.brainmask import brain_mask
from mslpipe.intensity import correct_bias_n4, flatten_field, normalise


# ---------------------------------------------------------------------------- normalise
def test_normalise_zscores_inside_brain_zero_outside():
    image, _, _ = _head()
    image = image * 3.7 + 250.0 * _ball()  # arbitrary scale and offset
    brain = brain_mask(image)
    out, stats = normalise(image, brain, 0.5, 99.5)
    assert out.dtype == np.float32 and out.shape == SHAPE
    assert abs(float(out[brain].mean())) < 1e-4
    assert abs(float(out[brain].std()) - 1.0) < 1e-4
    assert (out[~brain] == 0).all()
    assert stats["lower"] < stats["upper"] and stats["std"] > 0
    # clipping to the percentiles bounds the output
    assert out[brain].max() <= (stats["upper"] - stats["mean"]) / stats["std"] + 1e-5


def test_normalise_constant_brain_gives_zeros():
    image = np.where(_ball(), 5.0, 0.0).astype(np.float32)
    out, stats = normalise(image, _ball(), 0.5, 99.5)
    assert (out == 0).all() and stats["std"] == 1.0



@pytest.mark.parametrize("scheme", ["brain_percentile_zscore", "brain_percentile_median_iqr"])
def test_a_scan_stored_in_tiny_units_is_normalised_like_the_same_scan_in_ordinary_ones(scheme):
    """An absolute floor on the spread (1e-6) left a scan scaled by 1e-10 unscaled, so the network saw a blank
    brain; the floor is relative to the scan's own values."""
    image, _, _ = _head()
    brain = brain_mask(image)
    ordinary, _ = normalise(image, brain, 0.5, 99.5, scheme)
    tiny, stats = normalise((image * np.float32(1e-10)).astype(np.float32), brain, 0.5, 99.5, scheme)
    assert stats["std"] < 1e-6
    np.testing.assert_allclose(tiny, ordinary, atol=1e-3)


def test_median_iqr_normalisation_is_robust_to_a_dark_tail():
    """Both schemes map a normal brain to ~N(0, 1); adding dark voxels (more CSF in the mask) moves the z-score's
    centre and scale much more than the median/IQR's."""
    rng = np.random.default_rng(0)
    tissue = rng.normal(100, 10, 20000).astype(np.float32)
    with_csf = np.concatenate([tissue, rng.normal(30, 5, 4000).astype(np.float32)])
    lesion = 130.0
    shift = {}
    for scheme in ("brain_percentile_zscore", "brain_percentile_median_iqr"):
        values = []
        for data in (tissue, with_csf):
            image = np.append(data, lesion)[None, None, :]
            normed, stats = normalise(image, np.ones(image.shape, bool), 0.5, 99.5, scheme)
            values.append(float(normed[0, 0, -1]))
            if data is tissue:
                assert abs(stats["mean"] - 100) < 1 and abs(stats["std"] - 10) < 0.5  # ~N(0, 1) either way
        shift[scheme] = abs(values[1] - values[0])
    assert shift["brain_percentile_median_iqr"] < 0.5 * shift["brain_percentile_zscore"]



# ---------------------------------------------------------------------------- flat field
def _shaded_brain(shading: np.ndarray | None = None):
    """A 60³ mm ball of tissue 100 ± 5 with CSF-dark 40 speckles and a bright 'lesion' (150) off-centre, times an
    optional shading, on a zero background; (image, brain, lesion)."""
    rng = np.random.default_rng(4)
    shape = (64, 64, 64)
    brain = _ball(30.0, shape, np.array([31.5, 31.5, 31.5]))
    image = np.where(brain, rng.normal(100, 5, shape), 0).astype(np.float32)
    image[brain & (rng.random(shape) < 0.1)] = 40.0
    lesion = np.zeros(shape, bool)
    lesion[40:44, 28:32, 30:34] = True
    image[lesion] = 150.0
    if shading is not None:
        image = np.where(brain, image * shading, 0).astype(np.float32)
    return image, brain, lesion


def _ramp_result(correct):
    """The ball under a ±30 % left-right ramp, corrected by ``correct(image, brain)``: (image, brain, out, ratio of
    the right half's tissue to the left's before and after, the lesion's contrast to the tissue beside it after)."""
    ramp = np.linspace(0.7, 1.3, 64, dtype=np.float32)[:, None, None] * np.ones((64, 64, 64), np.float32)
    image, brain, lesion = _shaded_brain(ramp)
    out = correct(image, brain)
    tissue = brain & (image > 0) & ~lesion
    left, right = tissue.copy(), tissue.copy()
    left[32:], right[:32] = False, False
    before = np.median(image[right]) / np.median(image[left])
    after = np.median(out[right]) / np.median(out[left])
    near = tissue.copy()
    near[:36], near[48:] = False, False
    return image, brain, out, before, after, out[lesion].mean() / np.median(out[near])


def test_flatten_field_divides_out_a_ramp_and_keeps_lesion_contrast():
    """A ±30 % left-right ramp over a ball 60 mm across (a Gaussian of 10 mm, as 25 mm to a brain 140 mm across):
    before, the brain's two sides differ by over a fifth; after, by about 5 %. The lesion keeps its contrast to
    the tissue beside it, and the background stays zero."""
    image, brain, out, before, after, contrast = _ramp_result(
        lambda image, brain: flatten_field(image, brain, sigma_mm=10.0, spacing=(1.0, 1.0, 1.0)))
    assert before > 1.2 and abs(after - 1) < 0.07, (before, after)
    assert contrast == pytest.approx(150 / 100, rel=0.1)
    assert np.array_equal(out[~brain], image[~brain])


def test_flatten_field_leaves_an_even_brain_nearly_as_it_was():
    image, brain, lesion = _shaded_brain()
    out = flatten_field(image, brain, sigma_mm=20.0, spacing=(1.0, 1.0, 1.0))
    assert np.median(np.abs(out[brain] - image[brain]) / image[brain].clip(1)) < 0.05
    assert out.dtype == np.float32 and out.shape == image.shape


def test_flatten_field_does_not_brighten_tissue_beside_a_ventricle():
    """A dark ventricle (CSF, 20) the size of the Gaussian in an even brain is not a shading: the tissue around it
    keeps its level (the whole-brain local mean, pulled down by the CSF, brightened it by about an eighth), and so do a
    bright lesion and the ventricle itself, relative to the tissue."""
    image, brain, lesion = _shaded_brain()
    ventricle = np.zeros(image.shape, bool)
    ventricle[18:38, 20:40, 20:40] = True
    image[ventricle] = 20.0
    out = flatten_field(image, brain, sigma_mm=10.0, spacing=(1.0, 1.0, 1.0))
    tissue = brain & (image > 50) & (image < 140)
    shell = tissue & ndimage.binary_dilation(ventricle, iterations=3) & ~ventricle
    far = tissue & ~ndimage.binary_dilation(ventricle, iterations=12)
    ratio = np.median(out[shell]) / np.median(out[far])
    assert abs(ratio - 1) < 0.05, ratio
    assert out[lesion].mean() / np.median(out[far]) == pytest.approx(1.5, rel=0.1)


# ---------------------------------------------------------------------------- N4
def test_n4_removes_a_ramp_and_keeps_lesion_contrast():
    """N4 on the ±30 % ramp: the brain's two sides differ by over a fifth before and by under 5 % after; the lesion
    keeps its contrast to the tissue beside it, the background stays as it was, and the brain's level stays."""
    image, brain, out, before, after, contrast = _ramp_result(
        lambda image, brain: correct_bias_n4(image, brain, spacing=(2.0, 2.0, 2.0)))
    assert before > 1.2 and abs(after - 1) < 0.05, (before, after)
    assert contrast == pytest.approx(150 / 100, rel=0.1)
    assert np.array_equal(out[~brain], image[~brain])
    assert np.median(out[brain]) == pytest.approx(np.median(image[brain]), rel=0.05)
    assert out.dtype == np.float32 and out.shape == image.shape


def test_n4_does_not_shade_an_even_brain_with_a_ventricle():
    """An even brain with a dark ventricle the size of a quarter of it: N4 finds no shading, so the tissue beside the
    ventricle keeps its level (where the whole-brain local mean brightened it by about an eighth)."""
    image, brain, lesion = _shaded_brain()
    ventricle = np.zeros(image.shape, bool)
    ventricle[18:38, 20:40, 20:40] = True
    image[ventricle] = 20.0
    out = correct_bias_n4(image, brain, spacing=(2.0, 2.0, 2.0))
    tissue = brain & (image > 50) & (image < 140)
    shell = tissue & ndimage.binary_dilation(ventricle, iterations=3) & ~ventricle
    far = tissue & ~ndimage.binary_dilation(ventricle, iterations=12)
    assert abs(np.median(out[shell]) / np.median(out[far]) - 1) < 0.03
    assert np.median(np.abs(out[brain] - image[brain]) / image[brain].clip(1)) < 0.03


def test_n4_leaves_an_almost_empty_brain_alone():
    image = np.zeros((16, 16, 16), np.float32)
    brain = np.zeros(image.shape, bool)
    brain[4:6, 4:6, 4:6] = True
    image[brain] = 5.0
    assert np.array_equal(correct_bias_n4(image, brain, spacing=(1.0, 1.0, 1.0)), image)


def test_n4_on_a_real_scan(real_data):
    """A real, curator-corrected scan (Lesjak's training01_01): N4 finds no field (brain voxels change by under 1 %).
    The same scan under a ±30 % left-right ramp: N4 brings its two halves' tissue within 3 % of each other."""
    from mslpipe.brainmask import bounding_box
    from mslpipe.io import load_image, load_mask

    image, _ = load_image(real_data / "training/training01/preprocessed/training01_01_flair_pp.nii.gz")
    lesion = load_mask(real_data / "training/training01/masks/training01_01_mask1.nii.gz")
    brain = brain_mask(image)
    box = tuple(slice(a, b) for a, b in bounding_box(brain, 4))
    image, brain, lesion = image[box], brain[box], lesion[box] > 0
    out = correct_bias_n4(image, brain, spacing=(1.0, 1.0, 1.0))
    assert np.median(np.abs(out[brain] - image[brain]) / np.abs(image[brain]).clip(1)) < 0.01
    lo = float(np.percentile(image[brain], 0.5))
    ramp = np.linspace(0.7, 1.3, image.shape[0], dtype=np.float32)[:, None, None]
    shaded = np.where(brain, (image - lo) * ramp + lo, image).astype(np.float32)
    out = correct_bias_n4(shaded, brain, spacing=(1.0, 1.0, 1.0))
    tissue = brain & ~lesion
    half = image.shape[0] // 2
    left, right = tissue.copy(), tissue.copy()
    left[half:], right[:half] = False, False

    def ratio(a):
        return (np.median(a[right]) - lo) / (np.median(a[left]) - lo)

    assert ratio(shaded) > 1.2 and abs(ratio(out) - 1) < 0.03, (ratio(shaded), ratio(out))
