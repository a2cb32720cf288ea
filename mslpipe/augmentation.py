"""Augmentation of 2D training slices: MONAI dictionary transforms built from the plan's ``augmentation``.

:func:`build_augmentation` composes them over ``{"image": (C, H, W), "label": (1, H, W)}`` tensors, nnU-Net's
choices translated into MONAI's terms; :class:`RandBrainBiasFieldd` adds a smooth shading of the brain that nnU-Net
does not have (scans from other scanners, without bias-field correction).
"""

from __future__ import annotations

import math

import torch
from monai.transforms import (
    Compose,
    Identityd,
    MapTransform,
    OneOf,
    Rand2DElasticd,
    RandAdjustContrastd,
    RandBiasField,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandomizableTransform,
    RandRotated,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    RandSimulateLowResolutiond,
    RandZoomd,
)

from mslpipe.errors import MslpipeError
from mslpipe.plans import Augmentation

# std of batchgenerators' displacement field, gaussian_filter(U(-1, 1), sigma) * alpha, is
# alpha * sqrt(1/3) / (2 sqrt(pi) sigma) in 2D: alpha * _ELASTIC_K / sigma pixels.
_ELASTIC_K = 1.0 / (2.0 * math.sqrt(3.0 * math.pi))


def elastic_parameters(aug: Augmentation) -> tuple[float, tuple[float, float]]:
    """Translate nnU-Net's elastic (sigma, alpha) ranges into MONAI's Rand2DElastic terms.

    batchgenerators smooths U(-1, 1) noise with a Gaussian of width ``sigma`` and scales it
    by ``alpha``; MONAI draws N(0, 1) offsets on a control grid ``spacing`` pixels apart,
    scales them by a magnitude and interpolates bicubically. A Gaussian-smoothed field
    decorrelates over about ``2 sigma``, hence ``spacing = 2 * mean(sigma)``; the magnitude
    range spans the displacement std ``alpha * K / sigma`` over both ranges
    (``K = 1 / (2 sqrt(3 pi))``), e.g. (0.63, 2.7) px for the defaults.
    """
    s0, s1 = sorted(float(s) for s in aug.elastic_sigma)
    a0, a1 = sorted(float(a) for a in aug.elastic_magnitude)
    if s0 <= 0:
        raise MslpipeError(f"invalid plan: elastic_sigma must be positive, got {aug.elastic_sigma}")
    spacing = max(2.0, round(s0 + s1))
    return spacing, (a0 * _ELASTIC_K / s1, a1 * _ELASTIC_K / s0)


def build_augmentation(aug: Augmentation):
    """Compose MONAI dictionary transforms over ``{"image": (C,H,W), "label": (1,H,W)}`` tensors.

    Order as nnU-Net: spatial (rotate, zoom, elastic), then intensity on "image" only (bias field, noise,
    blur, brightness, contrast, gamma), then mirroring. Choices:

    * spatial transforms share their random draw across both keys; labels use **bilinear**
      interpolation and stay soft (a convex combination of values in [0, 1] with zero
      padding stays in [0, 1]; the loader clamps anyway). Padding is zeros, the value of
      the background in the preprocessed data. RandZoom ``keep_size`` crops or zero-pads.
    * Rand2DElasticd resamples even when it does not fire, so it sits in a ``OneOf`` with
      ``Identityd`` weighted ``(p, 1 - p)`` and its own ``prob`` is 1.
    * brightness: RandScaleIntensityd, ``v * (1 + f)`` with ``1 + f`` in ``brightness_range``.
    * contrast: RandScaleIntensityFixedMeand, scaling around each channel's mean, clipped to
      that channel's original range (``preserve_range``), as batchgenerators does.
    * gamma: RandAdjustContrastd computes ``((x - min) / range) ** g * range + min``, i.e. it
      rescales to [0, 1] and back internally, so it is safe on z-scored data; with
      ``retain_stats`` the mean and std are restored (nnU-Net). Its min, range and stats span
      all channels together, not each channel.
    * bias field: :class:`RandBrainBiasFieldd` (not in nnU-Net), first of the intensity transforms, since a
      scanner's shading acts on the signal before its noise. Off (``p_bias_field`` 0) in older plans.
    * noise: RandGaussianNoised with the std drawn from U(0, ``noise_std``) per sample.
    * blur: RandGaussianSmoothd, sigma per axis drawn from ``blur_sigma``.
    * low resolution: RandSimulateLowResolutiond (nnU-Net's SimulateLowResolutionTransform) on
      "image": down by a zoom drawn from ``low_res_zoom`` with nearest neighbour, back up bilinearly;
      after contrast, before gamma, as nnU-Net orders them. Off (``p_low_res`` 0) in older plans.
    """
    keys = ["image", "label"]
    spacing, magnitude = elastic_parameters(aug)
    elastic = Rand2DElasticd(keys, spacing=spacing, magnitude_range=magnitude, prob=1.0,
                             mode="bilinear", padding_mode="zeros")
    if 0.0 < aug.p_elastic < 1.0:
        elastic = OneOf([elastic, Identityd(keys)], weights=[aug.p_elastic, 1.0 - aug.p_elastic])
    lo_b, hi_b = aug.brightness_range
    lo_c, hi_c = aug.contrast_range
    steps = [
        RandRotated(keys, range_x=math.radians(aug.rotate_deg), prob=aug.p_rotate, keep_size=True,
                    mode="bilinear", padding_mode="zeros"),
        RandZoomd(keys, prob=aug.p_scale, min_zoom=min(aug.scale_range), max_zoom=max(aug.scale_range),
                  mode="bilinear", padding_mode="constant", keep_size=True),
        elastic if aug.p_elastic > 0 else None,
        RandBrainBiasFieldd("image", prob=aug.p_bias_field, coeff_range=tuple(aug.bias_field_coeff))
        if aug.p_bias_field > 0 else None,
        RandGaussianNoised("image", prob=aug.p_noise, std=aug.noise_std),
        RandGaussianSmoothd("image", sigma_x=tuple(aug.blur_sigma), sigma_y=tuple(aug.blur_sigma),
                            prob=aug.p_blur),
        RandScaleIntensityd("image", factors=(lo_b - 1.0, hi_b - 1.0), prob=aug.p_brightness),
        RandScaleIntensityFixedMeand("image", factors=(lo_c - 1.0, hi_c - 1.0), prob=aug.p_contrast,
                                     fixed_mean=True, preserve_range=True, channel_wise=True),
        RandSimulateLowResolutiond("image", prob=aug.p_low_res, downsample_mode="nearest", upsample_mode="bilinear",
                                   zoom_range=tuple(aug.low_res_zoom)) if aug.p_low_res > 0 else None,
        RandAdjustContrastd("image", prob=aug.p_gamma, gamma=tuple(aug.gamma_range), retain_stats=True),
    ]
    for axis in aug.mirror_axes:
        if axis not in (0, 1):
            raise MslpipeError(f"invalid plan: mirror_axes must be 0 or 1 for 2D slices, got {axis}")
        steps.append(RandFlipd(keys, prob=0.5, spatial_axis=axis))
    return Compose([s for s in steps if s is not None])


def shade_brain(image: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
    """A normalised (C, H, W) slice as if its scan had been shaded by ``field`` (H, W, positive) before normalising.

    The brain is the non-zero voxels of each channel (the preprocessed background is exactly 0), and each channel's
    darkest brain value stands for no signal: ``x -> (x - lo) * field + lo`` on the brain, the background untouched.
    The field is divided by its mean over the brain first, so the slice is shaded, not made brighter or darker as
    a whole (brightness has its own transform).
    """
    brain = image != 0
    n = brain.sum(dim=(1, 2), keepdim=True)
    if not n.any():
        return image.clone()
    lo = torch.where(brain, image, torch.inf).amin(dim=(1, 2), keepdim=True)
    mean = (field * brain).sum(dim=(1, 2), keepdim=True) / n.clamp_min(1)
    return torch.where(brain, (image - lo) * (field / mean.clamp_min(1e-12)) + lo, image)


class RandBrainBiasFieldd(RandomizableTransform, MapTransform):
    """With probability ``prob``, shade the brain of each key's (C, H, W) slice by one smooth random field.

    The field is MONAI's :class:`~monai.transforms.RandBiasField` (the exponential of a random Legendre
    polynomial of ``degree``, coefficients drawn from ``coeff_range``); every channel of a sample (its context
    slices too) gets the same field, as neighbouring slices of one scan share their shading. See
    :func:`shade_brain` for how a field is applied to z-scored data.
    """

    def __init__(self, keys, prob: float, degree: int = 3, coeff_range: tuple[float, float] = (0.0, 0.1)):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.field = RandBiasField(degree=degree, coeff_range=coeff_range, prob=1.0)

    def set_random_state(self, seed=None, state=None):
        super().set_random_state(seed, state)
        self.field.set_random_state(state=self.R)
        return self

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = torch.as_tensor(d[key])
            field = torch.as_tensor(self.field(torch.ones((1, *image.shape[1:]), dtype=image.dtype)))[0]
            d[key] = shade_brain(image, field)
        return d

