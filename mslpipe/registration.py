"""Rigid registration of a follow-up scan to its baseline, so that `compare` can take scans from two visits.

Two visits of one patient are rarely on one grid: the head sits differently in the scanner. Lesion change
needs voxel-wise correspondence, so :func:`register_rigid` finds the rotation and translation (6 degrees of
freedom; one head, so no scaling or shear) that best aligns the follow-up FLAIR with the baseline FLAIR by
Mattes mutual information (SimpleITK's registration framework: moments initialisation, three resolution
levels, regular-step gradient descent), and :func:`resample_mask` maps the follow-up's lesion mask onto the
baseline grid with it: by the lesion probability map the mask was thresholded from where there is one (linear
interpolation of the smooth map, then its threshold, within the mask's own lesions: a 0/1 mask interpolated and
cut at 0.5 loses voxels at every curved border, so lesions shrank a little on every registered comparison), else
by the 0/1 mask itself (linear interpolation, then >= 0.5). :func:`coverage` is the part of the baseline grid the
follow-up's field of view reaches.

The result is checked, not trusted: :class:`Rigid` carries the normalised cross-correlation of the two brains,
over the baseline's brain where the follow-up covers it, before and after, and `compare` warns when the aligned
scans correlate poorly. Which alignment is kept goes by the correlation's size: an inverted contrast correlates
strongly, negatively, and is said so.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mslpipe.brainmask import bright_voxels
from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_path, numpy_to_sitk

log = logging.getLogger(__name__)

# below this correlation of the aligned brains (after), `compare` warns that the registration may have failed
MIN_ALIGNED_CORRELATION = 0.7


@dataclass
class Rigid:
    """A follow-up → baseline rigid transform (SimpleITK, LPS physical space) and how well it aligns."""

    transform: object
    rotation_deg: tuple[float, float, float]
    translation_mm: tuple[float, float, float]
    correlation_before: float
    correlation_after: float
    metric: float
    # the optimiser's transform aligned the brains worse than the scanner coordinates did, which were kept
    kept_scanner_alignment: bool = False
    # the baseline-grid voxels the follow-up's field of view reaches under ``transform`` (:func:`coverage`)
    covered: np.ndarray | None = field(default=None, repr=False)

    def summary(self) -> dict:
        centre = self.transform.GetCenter() if hasattr(self.transform, "GetCenter") else (0.0, 0.0, 0.0)
        return {"rotation_deg": [round(v, 3) for v in self.rotation_deg],
                "translation_mm": [round(v, 3) for v in self.translation_mm],
                "rotation_centre_lps_mm": [round(float(v), 3) for v in centre],
                "correlation_before": round(self.correlation_before, 4),
                "correlation_after": round(self.correlation_after, 4), "mattes_mi": round(self.metric, 5),
                "kept_scanner_alignment": self.kept_scanner_alignment}


def _correlation(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float:
    x, y = a[where].astype(np.float64), b[where].astype(np.float64)
    if x.size < 2 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def register_rigid(fixed: np.ndarray, fixed_affine: np.ndarray, moving: np.ndarray, moving_affine: np.ndarray,
                   *, seed: int = 12345, where: object = None) -> Rigid:
    """The rigid transform that maps ``fixed`` (baseline) points onto ``moving`` (follow-up) points, which is what
    resampling the follow-up onto the baseline grid needs. ``where`` names the scans in errors."""
    import SimpleITK as sitk

    f_img, m_img = numpy_to_sitk(fixed, fixed_affine), numpy_to_sitk(moving, moving_affine)
    if not (bright_voxels(fixed).any() and bright_voxels(moving).any()):  # a blank or one-value scan too
        raise MslpipeError("cannot register an empty scan (no voxel above its background)", where)
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=200,
                                                 relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    reg.SetOptimizerScalesFromPhysicalShift()
    initial = sitk.CenteredTransformInitializer(f_img, m_img, sitk.Euler3DTransform(),
                                                sitk.CenteredTransformInitializerFilter.MOMENTS)
    reg.SetInitialTransform(initial, inPlace=False)
    reg.SetShrinkFactorsPerLevel([4, 2, 1])
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    try:
        transform = reg.Execute(f_img, m_img)
    except RuntimeError as exc:
        raise MslpipeError(f"registration failed ({str(exc).strip().splitlines()[-1]})", where) from exc
    # not in place, Execute returns the optimised copy of the initial transform inside a composite one
    inner = transform.GetNthTransform(0) if transform.GetName() == "CompositeTransform" else transform
    euler = sitk.Euler3DTransform(inner)
    params = euler.GetParameters()
    brain = bright_voxels(fixed)
    identity = sitk.Transform()
    before = _resample(moving, moving_affine, fixed.shape, fixed_affine, identity, linear=True)
    after = _resample(moving, moving_affine, fixed.shape, fixed_affine, euler, linear=True)
    # over the baseline's brain where the follow-up reaches: outside its field of view the resampled image is 0
    covered_before = coverage(moving.shape, moving_affine, fixed.shape, fixed_affine, identity)
    covered_after = coverage(moving.shape, moving_affine, fixed.shape, fixed_affine, euler)
    result = Rigid(euler, tuple(math.degrees(v) for v in params[:3]), tuple(float(v) for v in params[3:]),
                   _correlation(fixed, before, brain & covered_before),
                   _correlation(fixed, after, brain & covered_after), float(reg.GetMetricValue()),
                   covered=covered_after)
    if not abs(result.correlation_after) >= abs(result.correlation_before):  # e.g. visits already on one grid (MNI)
        log.warning("the registration aligned the brains worse than their scanner coordinates (correlation %.3f -> "
                    "%.3f): kept the scanner coordinates", result.correlation_before, result.correlation_after)
        result = Rigid(sitk.Euler3DTransform(), (0.0, 0.0, 0.0), (0.0, 0.0, 0.0), result.correlation_before,
                       result.correlation_before, result.metric, kept_scanner_alignment=True, covered=covered_before)
    if result.correlation_after < -0.5:
        log.warning("the aligned scans correlate negatively (%.2f): the follow-up's contrast is the baseline's "
                    "inverted, not the same kind of FLAIR?", result.correlation_after)
    log.info("registered: rotation %s deg, translation %s mm, correlation %.3f -> %.3f",
             result.summary()["rotation_deg"], result.summary()["translation_mm"], result.correlation_before,
             result.correlation_after)
    return result


def _resample(moving: np.ndarray, moving_affine: np.ndarray, shape, fixed_affine: np.ndarray, transform,
              linear: bool) -> np.ndarray:
    import SimpleITK as sitk

    reference = numpy_to_sitk(np.zeros(shape, np.float32), fixed_affine)
    out = sitk.Resample(numpy_to_sitk(moving, moving_affine), reference, transform,
                        sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def resample_image(moving: np.ndarray, moving_affine: np.ndarray, shape, fixed_affine: np.ndarray,
                   rigid: Rigid) -> np.ndarray:
    """The follow-up image on the baseline grid (linear interpolation, 0 outside the follow-up's field)."""
    return _resample(moving, moving_affine, shape, fixed_affine, rigid.transform, linear=True)


def resample_mask(mask: np.ndarray, mask_affine: np.ndarray, shape, fixed_affine: np.ndarray,
                  rigid: Rigid, probability: np.ndarray | None = None, threshold: float = 0.5) -> np.ndarray:
    """The follow-up's 0/1 lesion mask on the baseline grid, as uint8 (:func:`resample_lesions`' mask)."""
    return resample_lesions(mask, mask_affine, shape, fixed_affine, rigid, probability, threshold)[0]


def resample_lesions(mask: np.ndarray, mask_affine: np.ndarray, shape, fixed_affine: np.ndarray, rigid: Rigid,
                     probability: np.ndarray | None = None,
                     threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray | None]:
    """The follow-up's 0/1 lesion mask on the baseline grid (uint8), and its probability map there (or None).
    With the ``probability`` map the mask was thresholded from (on the mask's grid): the mask is that map
    interpolated and cut at ``threshold``, within the mask's lesions (interpolated, > 0: lesions postprocessing
    removed stay removed); else the 0/1 mask interpolated and cut at 0.5."""
    moved = _resample(np.asarray(mask, dtype=np.float32), mask_affine, shape, fixed_affine, rigid.transform,
                      linear=True)
    if probability is None:
        return (moved >= 0.5).astype(np.uint8), None
    prob = resample_image(np.asarray(probability, dtype=np.float32), mask_affine, shape, fixed_affine, rigid)
    return ((prob >= threshold) & (moved > 0)).astype(np.uint8), prob


def coverage(moving_shape, moving_affine: np.ndarray, shape, fixed_affine: np.ndarray, transform) -> np.ndarray:
    """The baseline-grid voxels inside the follow-up's field of view (its grid's box, moved by ``transform``)."""
    inside = _resample(np.ones(moving_shape, np.float32), moving_affine, shape, fixed_affine, transform,
                       linear=False)
    return inside > 0.5


def write_transform(rigid: Rigid, path: Path) -> Path:
    """Save the transform as an ITK transform file (``sitk.ReadTransform`` reads it back)."""
    import SimpleITK as sitk

    with atomic_path(path, suffix=".tfm") as tmp:
        sitk.WriteTransform(rigid.transform, str(tmp))
    return Path(path)
