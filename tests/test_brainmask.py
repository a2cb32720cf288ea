"""brainmask: the brain mask's threshold and morphology, checked against scipy's own functions, and the box."""

from __future__ import annotations

import numpy as np
import pytest
from test_preprocess import SHAPE, _ball, _head

from mslpipe.brainmask import background_level, bounding_box, brain_mask, bright_voxels, fill_holes, open_faces


def test_brain_mask_ball_with_zero_background():
    image, _, _ = _head()
    ball = _ball()
    mask = brain_mask(image)
    assert mask.dtype == bool and mask.shape == SHAPE
    assert not (mask & ~ball).any()  # nothing outside the ball
    assert (ball & ~mask).sum() <= 0.02 * ball.sum()  # at most the ball's outermost tips trimmed


def test_brain_mask_fills_dark_interior():
    image, _, _ = _head()
    ventricle = _ball(3.0)
    image[ventricle] = 0.0
    mask = brain_mask(image)
    assert mask[ventricle].all()


def _bright_voxels_before(image, fraction=0.05):  # the threshold as it was: a fraction of the positive voxels'
    positive = image[image > 0]
    return image > fraction * float(np.percentile(positive, 99.5))


@pytest.mark.parametrize("background", ["offset", "constant", "air noise"])
def test_a_background_that_is_not_zero_is_no_brain(background):
    """A whole scan offset by 100, a constant fill of 20 around the brain, or air's noise (N(20, 5)) around it: the
    mask is the brain's, not the field of view (the threshold was a fraction of the bright end measured from 0,
    which every such background passes); with a zero background the threshold is what it was."""
    image, _, _ = _head()
    ball = _ball()
    clean = brain_mask(image)
    np.testing.assert_array_equal(bright_voxels(image), _bright_voxels_before(image))
    rng = np.random.default_rng(2)
    shifted = {"offset": image + 100.0, "constant": np.where(ball, image, 20.0),
               "air noise": np.where(ball, image, rng.normal(20.0, 5.0, SHAPE))}[background].astype(np.float32)
    assert _bright_voxels_before(shifted).mean() > 0.9  # the old threshold took (nearly) everything
    mask = brain_mask(shifted)
    assert 2 * (mask & clean).sum() / (mask.sum() + clean.sum()) > 0.98
    level, spread = background_level(shifted)
    assert level == pytest.approx({"offset": 100.0, "constant": 20.0, "air noise": 20.0}[background], abs=1.0)
    assert (spread > 3.0) is (background == "air noise")


def test_tissue_on_every_face_is_no_background():
    """A bright shell on all six faces (a head cropped to its scalp): the darkest face is brighter than most of
    the volume, so it is no background and the threshold is measured from 0, as for a stripped scan."""
    image, _, _ = _head()
    shell = np.pad(image, 4)
    bright = float(image.max())
    shell[:2], shell[-2:], shell[:, :2], shell[:, -2:], shell[:, :, :2], shell[:, :, -2:] = (bright,) * 6
    assert background_level(shell) == (0.0, 0.0)
    assert brain_mask(shell).sum() > brain_mask(image).sum()  # the shell and all it holds: the size warning's case


@pytest.mark.parametrize("noise", [(-3.0, 3.0), (-3.0, 0.0), (0.0, 3.0)])
def test_brain_mask_with_small_background_noise(noise):
    image, _, _ = _head()
    ball = _ball()
    clean = brain_mask(image)
    rng = np.random.default_rng(1)
    noisy = image + np.where(ball, 0.0, rng.uniform(*noise, SHAPE)).astype(np.float32)
    noisy[0, 0, 0] = noisy[1, 0, 0] = 40.0  # a bright background speck
    mask = brain_mask(noisy)
    assert not (mask & ~ball).any()
    np.testing.assert_array_equal(mask, clean)


def test_brain_mask_of_empty_image():
    assert not brain_mask(np.zeros(SHAPE, np.float32)).any()
    assert not brain_mask(-np.ones(SHAPE, np.float32)).any()


def _brain_mask_on_whole_volume(image: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """brain_mask's definition, spelt with scipy's own functions on the whole volume (the slow way)."""
    from scipy import ndimage

    mask = bright_voxels(image, fraction)  # the threshold is tested on its own above; here the morphology
    if not mask.any():
        return mask
    mask = ndimage.binary_opening(mask, iterations=1) if mask.sum() > 1000 else mask
    labels, n = ndimage.label(mask)
    if n > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= 0.01 * sizes.max()))
    return ndimage.binary_fill_holes(mask)


def test_brain_mask_equals_whole_volume_morphology():
    """Cropping to the thresholded box and filling holes by labelling change nothing: random smooth
    volumes (blobs that touch the borders, several components, holes), big enough for the opening."""
    from scipy import ndimage

    rng = np.random.default_rng(7)
    for _ in range(40):
        shape = tuple(int(v) for v in rng.integers(4, 26, size=3))
        image = ndimage.gaussian_filter(rng.normal(size=shape), rng.uniform(0.5, 3.0)) + rng.uniform(-0.3, 0.3)
        np.testing.assert_array_equal(brain_mask(image), _brain_mask_on_whole_volume(image))
    image, _, _ = _head()
    image[_ball(3.0)] = 0.0  # a hole inside the big component
    np.testing.assert_array_equal(brain_mask(image), _brain_mask_on_whole_volume(image))


def _random_masks(seed: int, max_fill: float):
    """30 random 2D and 30 random 3D masks of 1-13 voxels per side, filled 20 % to ``max_fill``."""
    rng = np.random.default_rng(seed)
    for ndim in (2, 3):
        for _ in range(30):
            yield rng.random(tuple(int(v) for v in rng.integers(1, 14, size=ndim))) < rng.uniform(0.2, max_fill)


def test_fill_holes_equals_scipy():
    from scipy import ndimage

    for mask in _random_masks(3, 0.9):
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))
    shell = _ball(8.0) & ~_ball(5.0)
    assert fill_holes(shell).sum() == _ball(8.0).sum()


def test_open_faces_equals_scipy():
    from scipy import ndimage

    for mask in _random_masks(5, 0.95):
        np.testing.assert_array_equal(open_faces(mask), ndimage.binary_opening(mask))
    ball = _ball(8.0)
    ball[12, 13, :] = True  # a one-voxel-thin rod through it, which the opening removes outside the ball
    opened = open_faces(ball)
    np.testing.assert_array_equal(opened, ndimage.binary_opening(ball))
    assert not opened[12, 13, [0, -1]].any() and opened.sum() > 0.9 * _ball(8.0).sum()


def test_bounding_box():
    mask = np.zeros((10, 12, 8), dtype=bool)
    mask[2:5, 7, 0] = True
    assert bounding_box(mask, 0) == [[2, 5], [7, 8], [0, 1]]
    assert bounding_box(mask, 3) == [[0, 8], [4, 11], [0, 4]]
    with pytest.raises(ValueError):
        bounding_box(np.zeros((3, 3), dtype=bool), 1)


# ---------------------------------------------------------------------------- rater policies


@pytest.mark.parametrize("thickness", [1, 2])
def test_a_scan_of_one_or_two_slices_keeps_its_brain(thickness):
    """The opening that drops specks would erase a slab under 3 voxels thick, and the scan was then refused as
    empty; such a mask is kept unopened. Thicker scans are opened as before."""
    big = np.zeros((80, 80, 40), dtype=np.float32)
    big[10:70, 10:70, :] = 100.0  # 3600 voxels a slice: over the opening's 1000
    thin = big[:, :, :thickness]
    mask = brain_mask(thin)
    assert mask.sum() == (thin > 0).sum()
    speck = big.copy()
    speck[2, 2, 20] = 100.0  # a lone bright voxel: the opening still removes it in a thick scan
    assert not brain_mask(speck)[2, 2, 20] and brain_mask(speck)[40, 40, 20]
