"""Intensity of one scan inside its brain mask: the plan's normalisation, and the optional shading correction
before it (a flat field, or N4).

numpy, scipy and (for N4, imported inside the function) SimpleITK, no project imports: :mod:`mslpipe.preprocess`
calls them per channel, on the brain's bounding box.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

IQR_TO_STD = 1.349  # the interquartile range of a normal distribution, in standard deviations
# Tissue for the flat field's shading: once-flattened intensity within these multiples of the brain's median. FLAIR
# CSF lies far below (suppressed), lesions mostly above; grey and white matter within.
TISSUE_RANGE = (0.6, 1.4)


def normalise(image: np.ndarray, brain: np.ndarray, lower_pct: float, upper_pct: float,
              scheme: str = "brain_percentile_zscore") -> tuple[np.ndarray, dict[str, float]]:
    """Clip to the brain's percentiles, then centre and scale inside the brain, zero outside.

    ``brain_percentile_zscore`` (this function's default, and what plans written before median/IQR became the
    planner's default say) centres on the mean and divides by the standard deviation;
    ``brain_percentile_median_iqr`` centres on the median and divides by the interquartile range / 1.349 (the
    standard deviation for normally distributed intensities), which the share of dark CSF or of bright lesions
    in the brain mask moves less. The stats keep the names ``mean`` and ``std`` for the centre and scale used.
    """
    values = image[brain]
    lo, hi = (float(v) for v in np.percentile(values, [lower_pct, upper_pct]))
    clipped = np.clip(values, lo, hi)
    if scheme == "brain_percentile_median_iqr":
        q1, median, q3 = (float(v) for v in np.percentile(clipped, [25, 50, 75]))
        mean, std = median, (q3 - q1) / IQR_TO_STD
    else:
        mean, std = float(clipped.mean()), float(clipped.std())
    # a flat brain (std 0) is left unscaled; the floor is relative, so a scan stored in tiny units (1e-10) is scaled
    std = std if std > 1e-6 * max(abs(lo), abs(hi)) and std > 0 else 1.0
    out = np.zeros(image.shape, dtype=np.float32)
    out[brain] = (clipped - mean) / std
    return out, {"lower": lo, "upper": hi, "mean": mean, "std": std}


def flatten_field(image: np.ndarray, brain: np.ndarray, sigma_mm: float, spacing, step: int = 4,
                  tissue_range: tuple[float, float] = TISSUE_RANGE) -> np.ndarray:
    """The image with its slow shading across the brain (an uncorrected bias field) divided out.

    The shading is the local mean intensity of the brain's tissue: a Gaussian of ``sigma_mm`` over tissue voxels
    alone (normalised convolution: the smoothed image over the smoothed mask, so neither the background nor the
    voxels left out darken or brighten it), taken on a grid ``step`` times coarser (the shading is smooth; a
    182-slice volume takes about a second) and interpolated back. Tissue is found in two passes: the first takes the
    whole brain; the second keeps the voxels whose once-flattened intensity lies within ``tissue_range`` times the
    brain's median, so that dark CSF (ventricles, sulci) and bright lesions, which differ from tissue in kind and
    not by shading, do not bend the estimate (without this, the tissue beside the ventricles, where periventricular
    lesions lie, comes out brighter). Intensities are measured from the brain's 0.5th percentile, which stands for
    no signal (not every scan has a zero background); the shading is divided out relative to its median over the
    brain, so the brain's overall level stays. Lesions, far smaller than ``sigma_mm``, keep their contrast to the
    tissue around them. Outside the brain the image is unchanged. Near the brain's edge the local mean leans toward
    the centre, so a shading is divided out largely, not wholly (three quarters of a ramp across a ball four widths
    of ``sigma_mm`` across).
    """
    lo = float(np.percentile(image[brain], 0.5))
    signal = np.where(brain, np.maximum(image - lo, 0.0), 0.0).astype(np.float32)
    padded = tuple(-(-n // step) * step for n in image.shape)
    pad = [(0, m - n) for m, n in zip(padded, image.shape, strict=True)]
    sigma = [sigma_mm / (float(s) * step) for s in spacing]

    def coarse(a: np.ndarray) -> np.ndarray:
        blocks = np.pad(a, pad).reshape(padded[0] // step, step, padded[1] // step, step, padded[2] // step, step)
        return blocks.mean(axis=(1, 3, 5))

    def shading(weights: np.ndarray) -> np.ndarray | None:
        smoothed = ndimage.gaussian_filter(coarse(weights), sigma)
        local = ndimage.gaussian_filter(coarse(signal * weights), sigma) / np.maximum(smoothed, 1e-3)
        local = ndimage.zoom(local, step, order=1, mode="nearest", grid_mode=True)
        local = local[tuple(slice(0, n) for n in image.shape)]
        reference = float(np.median(local[brain]))
        return np.maximum(local, 0.1 * reference) / reference if reference > 0 else None

    first = shading(brain.astype(np.float32))
    if first is None:
        return image
    flat = signal / first
    median = float(np.median(flat[brain]))
    tissue = brain & (flat >= tissue_range[0] * median) & (flat <= tissue_range[1] * median)
    second = shading(tissue.astype(np.float32)) if tissue.sum() > 0.25 * brain.sum() else None
    field = first if second is None else second
    return np.where(brain, signal / field + lo, image).astype(np.float32)


def correct_bias_n4(image: np.ndarray, brain: np.ndarray, spacing, levels: int = 3, shrink_mm: float = 4.0,
                    iterations: int = 50) -> np.ndarray:
    """The image with its bias field removed by N4 (Tustison et al. 2010; SimpleITK's
    ``N4BiasFieldCorrectionImageFilter``), fitted inside the brain.

    N4 finds the smooth multiplicative field (a cubic B-spline) whose removal makes the brain's intensity histogram
    sharpest, so unlike a local mean it is not bent by where CSF or lesions lie. ``levels`` fitting levels of
    ``iterations`` each, starting from 4 control points per axis (the mesh doubles per level: 3 levels give control
    points about 45 mm apart over a 180 mm brain, far coarser than lesions); fitted on a grid of about
    ``shrink_mm`` (a few seconds for a whole brain on two cores) and evaluated at full resolution. As in
    :func:`flatten_field`, intensities count from the brain's 0.5th percentile, the field is divided out relative
    to its median over the brain (the overall level stays), and outside the brain the image is unchanged.
    """
    import SimpleITK as sitk

    lo = float(np.percentile(image[brain], 0.5))
    signal = np.where(brain, np.maximum(image - lo, 0.0), 0.0).astype(np.float32)
    fit_mask = brain & (signal > 0)  # N4 works on log intensities
    if fit_mask.sum() < 64:
        return image
    spacing = [float(s) for s in spacing]

    def as_image(a: np.ndarray):
        img = sitk.GetImageFromArray(np.ascontiguousarray(a.transpose(2, 1, 0)))
        img.SetSpacing(spacing)
        return img

    full = as_image(signal)
    shrink = [max(1, int(round(shrink_mm / s))) for s in spacing]
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(iterations)] * int(levels))
    n4.Execute(sitk.Shrink(full, shrink), sitk.Shrink(as_image(fit_mask.astype(np.uint8)), shrink))
    log_field = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(full)).transpose(2, 1, 0)
    field = np.exp(log_field - float(np.median(log_field[brain])))
    return np.where(brain, signal / field + lo, image).astype(np.float32)
