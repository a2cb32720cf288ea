"""Tests for mslpipe.augmentation: the MONAI transforms built from a plan, and the brain bias field."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mslpipe.augmentation import RandBrainBiasFieldd, build_augmentation, elastic_parameters, shade_brain
from mslpipe.errors import MslpipeError
from mslpipe.plans import Augmentation

ALL_ON = dict(p_rotate=1.0, p_scale=1.0, p_elastic=1.0, p_brightness=1.0, p_contrast=1.0,
              p_gamma=1.0, p_noise=1.0, p_blur=1.0, p_low_res=1.0, p_bias_field=1.0)
ONLY_BIAS = {**{k: 0.0 for k in ALL_ON}, "p_bias_field": 1.0}


def test_gamma_on_z_scored_data_is_safe():
    # RandAdjustContrast rescales to [0, 1] before the power and back, so negative values are fine
    aug = Augmentation(**{**ALL_ON, "p_rotate": 0.0, "p_scale": 0.0, "p_elastic": 0.0, "p_noise": 0.0,
                          "p_blur": 0.0, "p_brightness": 0.0, "p_contrast": 0.0, "p_low_res": 0.0,
                          "p_bias_field": 0.0}, mirror_axes=())
    transform = build_augmentation(aug)
    transform.set_random_state(seed=0)
    image = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 16, 16)).astype(np.float32))
    out = transform({"image": image.clone(), "label": torch.zeros(1, 16, 16)})["image"]
    out = torch.as_tensor(out)
    assert torch.isfinite(out).all() and not torch.equal(out, image)
    assert abs(float(out.mean() - image.mean())) < 1e-4 and abs(float(out.std() - image.std())) < 1e-3


def test_low_resolution_simulation_coarsens_the_image_only():
    """p_low_res 1 with a fixed zoom of 0.5: 2×2 blocks go through one nearest-neighbour sample and back up
    bilinearly, so fine detail is lost, the label is untouched; p_low_res 0 leaves the transform out."""
    from monai.transforms import RandSimulateLowResolutiond

    only = {k: 0.0 for k in ALL_ON}
    aug = Augmentation(**{**only, "p_low_res": 1.0, "low_res_zoom": (0.5, 0.5)}, mirror_axes=())
    transform = build_augmentation(aug)
    assert any(isinstance(t, RandSimulateLowResolutiond) for t in transform.transforms)
    transform.set_random_state(seed=0)
    checker = (np.indices((3, 32, 32)).sum(0) % 2).astype(np.float32)  # finest possible detail
    label = torch.from_numpy((np.random.default_rng(0).random((1, 32, 32)) > 0.5).astype(np.float32))
    out = transform({"image": torch.from_numpy(checker), "label": label.clone()})
    image = torch.as_tensor(out["image"])
    assert image.shape == (3, 32, 32) and torch.equal(torch.as_tensor(out["label"]), label)
    assert float(image.std(dim=(1, 2)).max()) < 0.25 < float(checker[0].std())  # each slice's checkerboard is gone
    off = build_augmentation(Augmentation(**only, mirror_axes=()))
    assert not any(isinstance(t, RandSimulateLowResolutiond) for t in off.transforms)


def test_elastic_parameters_and_bad_mirror_axes():
    spacing, (lo, hi) = elastic_parameters(Augmentation())
    assert spacing == 22 and 0.5 < lo < hi < 3.0
    with pytest.raises(MslpipeError, match="mirror_axes"):
        build_augmentation(Augmentation(mirror_axes=(2,)))


def brain_slice(channels: int = 1, size: int = 32) -> torch.Tensor:
    """A z-scored-looking slice: a disc of values in [-1.5, 2.5] (never exactly 0), zero outside it."""
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 2 - 3) ** 2
    rng = np.random.default_rng(3)
    image = np.zeros((channels, size, size), np.float32)
    for c in range(channels):
        image[c][disc] = rng.uniform(-1.5, 2.5, int(disc.sum())).astype(np.float32)
    return torch.from_numpy(image)


def test_shade_brain_by_hand():
    """A left-to-right ramp: brain voxels become (x - lo) * field / mean(field over the brain) + lo; the darkest
    brain voxel and the background stay; a flat field changes nothing."""
    image = brain_slice(channels=2)
    ramp = torch.linspace(0.5, 1.5, 32).expand(32, 32).clone()
    out = shade_brain(image, ramp)
    for c in range(2):
        brain = image[c] != 0
        lo = image[c][brain].min()
        scale = ramp[brain] / ramp[brain].mean()
        assert torch.allclose(out[c][brain], (image[c][brain] - lo) * scale + lo, atol=1e-6)
        assert out[c][brain].min() >= lo - 1e-6
        assert torch.equal(out[c][~brain], image[c][~brain])  # background: zero, untouched
    right, left = image[0][:, 20:] != 0, image[0][:, :12] != 0
    # the right of the brain got brighter relative to the left
    change = out[0] - image[0]
    assert change[:, 20:][right].mean() - change[:, :12][left].mean() > 0.3
    assert torch.allclose(shade_brain(image, torch.full((32, 32), 3.0)), image, atol=1e-6)


def test_shade_brain_leaves_an_empty_slice_or_channel_alone():
    ramp = torch.linspace(0.5, 1.5, 32).expand(32, 32)
    empty = torch.zeros(1, 32, 32)
    assert torch.equal(shade_brain(empty, ramp), empty)
    one_empty = brain_slice(channels=2)
    one_empty[1] = 0  # a context slice beyond the brain
    out = shade_brain(one_empty, ramp)
    assert torch.isfinite(out).all() and torch.equal(out[1], one_empty[1]) and not torch.equal(out[0], one_empty[0])


def test_bias_field_transform_shades_the_image_only_and_is_seeded():
    """p 1: the image changes smoothly (one field for all channels), the label not, the background stays 0; the same
    seed gives the same field, another seed another; p_bias_field 0 leaves the transform out."""
    transform = build_augmentation(Augmentation(**ONLY_BIAS, mirror_axes=()))
    assert any(isinstance(t, RandBrainBiasFieldd) for t in transform.transforms)
    image, label = brain_slice(channels=3), torch.ones(1, 32, 32)

    def run(seed):
        transform.set_random_state(seed=seed)
        out = transform({"image": image.clone(), "label": label.clone()})
        assert torch.equal(torch.as_tensor(out["label"]), label)
        return torch.as_tensor(out["image"])

    a, b, c = run(5), run(5), run(6)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, image)
    assert torch.equal(a[image == 0], image[image == 0])
    brain = image[0] != 0
    factors = [(a[k][brain] - image[k][brain].min()) / (image[k][brain] - image[k][brain].min()).clamp_min(1e-3)
               for k in range(3)]
    well_defined = (image[0][brain] - image[0][brain].min() > 0.5) & (image[1][brain] - image[1][brain].min() > 0.5)
    assert torch.allclose(factors[0][well_defined], factors[1][well_defined], rtol=1e-4)  # one field for all
    assert float(factors[0][well_defined].std()) > 0.01  # and it is not flat
    off = build_augmentation(Augmentation(**{**ONLY_BIAS, "p_bias_field": 0.0}, mirror_axes=()))
    assert not any(isinstance(t, RandBrainBiasFieldd) for t in off.transforms)


def test_bias_field_probability_zero_point_five_fires_about_half_the_time():
    transform = RandBrainBiasFieldd("image", prob=0.5)
    transform.set_random_state(seed=0)
    image = brain_slice()
    fired = sum(not torch.equal(torch.as_tensor(transform({"image": image})["image"]), image) for _ in range(200))
    assert 70 < fired < 130
