"""Post-processing of predicted lesion masks: thresholding, removing specks, listing lesions.

Lesions are connected components (6-, 18- or 26-connectivity, default 26). Sizes are physical
(mm³ from the voxel spacing), never voxel counts, so a threshold means the same on any scanner.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from mslpipe.errors import MslpipeError

_RANKS = {6: 1, 18: 2, 26: 3}


def _structure(connectivity: int) -> np.ndarray:
    if connectivity not in _RANKS:
        raise MslpipeError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    return ndimage.generate_binary_structure(3, _RANKS[connectivity])


def label_lesions(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """(each lesion's voxels numbered with its id 1..n, 0 elsewhere; n): the ids :func:`lesion_table` gives."""
    return ndimage.label(np.asarray(mask) != 0, structure=_structure(connectivity))


def binarize(prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Voxels with ``prob >= threshold`` become 1, the rest 0 (uint8)."""
    threshold = float(threshold)
    if not math.isfinite(threshold):
        raise MslpipeError(f"threshold must be a finite number, got {threshold!r}")
    return (np.asarray(prob) >= threshold).astype(np.uint8)


def remove_small_components(mask: np.ndarray, spacing: Sequence[float], min_size_mm3: float,
                            connectivity: int = 26) -> np.ndarray:
    """Drop connected components smaller than ``min_size_mm3`` (mm³); keep every other one.

    A component of exactly ``min_size_mm3`` is kept. ``min_size_mm3 = 0`` is a no-op (returns a
    uint8 copy). This never reduces a mask to its largest component: MS brains have many lesions.
    """
    mask = np.asarray(mask) != 0
    min_size_mm3 = float(min_size_mm3)
    if not math.isfinite(min_size_mm3) or min_size_mm3 < 0:
        raise MslpipeError(f"minimum lesion size must be >= 0 mm³, got {min_size_mm3!r}")
    structure = _structure(connectivity)
    if min_size_mm3 == 0 or not mask.any():
        return mask.astype(np.uint8)
    sp = tuple(float(s) for s in spacing)
    if len(sp) != mask.ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {mask.ndim} positive numbers, got {spacing!r}")
    labels, n = ndimage.label(mask, structure=structure)
    volumes = np.bincount(labels.ravel(), minlength=n + 1) * float(np.prod(sp))
    keep = volumes >= min_size_mm3
    keep[0] = False
    return keep[labels].astype(np.uint8)


def apply(prob: np.ndarray, affine: np.ndarray, postprocessing: dict) -> np.ndarray:
    """The plan's postprocessing of a probability map on a scan's grid: threshold, then drop specks.

    ``postprocessing`` holds ``threshold`` (default 0.5), ``min_lesion_mm3`` (default 0) and
    ``connectivity`` (default 26); the voxel spacing comes from ``affine``. Returns a uint8 mask.
    """
    mask = binarize(prob, postprocessing.get("threshold", 0.5))
    if postprocessing.get("min_lesion_mm3", 0) > 0:
        spacing = tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))
        mask = remove_small_components(mask, spacing, postprocessing["min_lesion_mm3"],
                                       connectivity=postprocessing.get("connectivity", 26))
    return mask.astype(np.uint8)


def lesion_table(mask: np.ndarray, affine: np.ndarray, connectivity: int = 26,
                 probability: np.ndarray | None = None,
                 labelled: tuple[np.ndarray, int] | None = None) -> list[dict]:
    """One row per lesion (connected component), in label order.

    Each row: ``label`` (1-based id), ``n_voxels``, ``volume_mm3`` (voxel volume = |det| of the
    affine's 3×3 part), ``centroid_voxel`` (i, j, k), ``centroid_mm`` (world coordinates through
    ``affine``), and ``slice_range``: for each array axis the first and last index (inclusive). With the
    mask's ``probability`` map (same shape), also ``mean_probability`` and ``max_probability`` over the lesion.
    ``labelled``: :func:`label_lesions`' result for this mask, when the caller has it already.
    """
    mask = np.asarray(mask) != 0
    affine = np.asarray(affine, dtype=np.float64)
    if mask.ndim != 3 or affine.shape != (4, 4):
        raise ValueError("lesion_table needs a 3D mask and a 4×4 affine")
    if probability is not None and np.shape(probability) != mask.shape:
        raise ValueError(f"probability shape {np.shape(probability)} differs from the mask's {mask.shape}")
    labels, n = labelled if labelled is not None else label_lesions(mask, connectivity)
    if n == 0:
        return []
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    index = np.arange(1, n + 1)
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(mask, labels, index), dtype=np.float64).reshape(n, 3)
    world = centroids @ affine[:3, :3].T + affine[:3, 3]
    if probability is not None:
        prob = np.asarray(probability)
        means, peaks = ndimage.mean(prob, labels, index), ndimage.maximum(prob, labels, index)
    rows = []
    for lab, count, c_vox, c_mm, box in zip(index, counts, centroids, world,
                                            ndimage.find_objects(labels), strict=True):
        rows.append({
            "label": int(lab),
            "n_voxels": int(count),
            "volume_mm3": float(count) * voxel_mm3,
            "centroid_voxel": [float(v) for v in c_vox],
            "centroid_mm": [float(v) for v in c_mm],
            "slice_range": [[int(s.start), int(s.stop) - 1] for s in box],
        })
        if probability is not None:
            rows[-1].update(mean_probability=float(means[lab - 1]), max_probability=float(peaks[lab - 1]))
    return rows
