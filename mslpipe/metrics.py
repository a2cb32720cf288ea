"""Segmentation metrics on binary 3D masks: overlap, lesion-wise detection, volume, distance, ISBI score.

Every function takes ``pred`` and ``ref`` as arrays of the same shape (any dtype; non-zero is
foreground) and, where a physical size matters, ``spacing``: millimetres per voxel along each
axis. A lesion is a connected component; ``connectivity`` is 6, 18 or 26 (default 26).

Empty-case rules (one rule, applied everywhere a denominator can be zero):

* A ratio whose denominator is zero is **1.0 when both pred and ref are empty** (perfect agreement
  on "nothing") **and 0.0 otherwise**. This gives Dice = IoU = 1 for two empty masks; precision
  (PPV) = 0 for an empty prediction of a non-empty reference; recall (TPR) = 0 for a non-empty
  prediction of an empty reference; the same for lesion-wise LTPR and lesion precision.
* LFPR is defined as ``1 - lesion precision``: 0 when both are empty, 1 when the prediction is
  empty but the reference is not (so an empty prediction never earns the ISBI (1-LFPR) term).
* Lesion F1 = 2·P·R/(P+R) from lesion precision P and LTPR R, and 0 when P+R = 0.
* HD95 is 0.0 when both are empty and **NaN when exactly one side is empty** (undefined); callers
  skip NaN when averaging and report how many were skipped.
* Slice-level Dice: a slice empty in both masks counts as Dice 1 (see :func:`slice_dice`).
* The ISBI score is NaN, with a reason, when the volume correlation is undefined (see
  :func:`isbi_score`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from scipy import ndimage

from mslpipe.errors import MslpipeError

_RANKS = {6: 1, 18: 2, 26: 3}

EMPTY_CASE_RULES = (
    "A ratio with a zero denominator is 1 when pred and ref are both empty and 0 otherwise "
    "(Dice=IoU=1 for two empty masks; PPV=0 for an empty prediction of a non-empty reference; "
    "TPR=0 for a non-empty prediction of an empty reference; same for LTPR and lesion precision). "
    "LFPR = 1 - lesion precision (0 when both empty, 1 when only the prediction is empty). "
    "Lesion F1 = 2PR/(P+R), 0 when P+R=0. HD95 is 0 when both are empty and NaN (skipped in means, "
    "counted) when exactly one side is empty."
)

SLICE_DICE_NOTE = (
    "slice_dice_study is the mean of per-slice 2D Dice along the slice axis, counting slices empty "
    "in both masks as Dice 1 (as the original study did); it usually reads higher than volume Dice "
    "because most slices of a brain hold no lesion, and lower when false positives land on lesion-free "
    "slices (each then scores 0)."
)


# ---------------------------------------------------------------------------- helpers
def connectivity_structure(connectivity: int = 26) -> np.ndarray:
    """The 3×3×3 structuring element for 6-, 18- or 26-connectivity."""
    if connectivity not in _RANKS:
        raise MslpipeError(f"connectivity must be 6, 18 or 26, got {connectivity!r}")
    return ndimage.generate_binary_structure(3, _RANKS[connectivity])


def _pair(pred: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred) != 0
    ref = np.asarray(ref) != 0
    if pred.shape != ref.shape:
        raise ValueError(f"pred shape {pred.shape} differs from ref shape {ref.shape}")
    return pred, ref


def _ratio(num: float, den: float, both_empty: bool) -> float:
    if den == 0:
        return 1.0 if both_empty else 0.0
    return float(num) / float(den)


def _spacing(spacing: Sequence[float], ndim: int) -> tuple[float, ...]:
    sp = tuple(float(s) for s in spacing)
    if len(sp) != ndim or not all(math.isfinite(s) and s > 0 for s in sp):
        raise ValueError(f"spacing must be {ndim} positive numbers, got {spacing!r}")
    return sp


# ---------------------------------------------------------------------------- voxel overlap
def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """2|P∩R| / (|P|+|R|); 1.0 when both are empty."""
    p, r = _pair(pred, ref)
    tp, n_p, n_r = int(np.count_nonzero(p & r)), int(np.count_nonzero(p)), int(np.count_nonzero(r))
    return _ratio(2 * tp, n_p + n_r, n_p + n_r == 0)


def iou(pred: np.ndarray, ref: np.ndarray) -> float:
    """|P∩R| / |P∪R| (Jaccard); 1.0 when both are empty."""
    p, r = _pair(pred, ref)
    union = int(np.count_nonzero(p | r))
    return _ratio(int(np.count_nonzero(p & r)), union, union == 0)


def precision(pred: np.ndarray, ref: np.ndarray) -> float:
    """PPV = |P∩R| / |P|; with an empty prediction, 1.0 if ref is empty too, else 0.0."""
    p, r = _pair(pred, ref)
    n_p = int(np.count_nonzero(p))
    return _ratio(int(np.count_nonzero(p & r)), n_p, n_p == 0 and not r.any())


def recall(pred: np.ndarray, ref: np.ndarray) -> float:
    """TPR = |P∩R| / |R|; with an empty reference, 1.0 if pred is empty too, else 0.0."""
    p, r = _pair(pred, ref)
    n_r = int(np.count_nonzero(r))
    return _ratio(int(np.count_nonzero(p & r)), n_r, n_r == 0 and not p.any())


# ---------------------------------------------------------------------------- lesion-wise
def label_lesions(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a mask: (label array, number of lesions)."""
    labels, n = ndimage.label(np.asarray(mask) != 0, structure=connectivity_structure(connectivity))
    return labels, int(n)


def lesion_counts(pred: np.ndarray, ref: np.ndarray, connectivity: int = 26) -> dict[str, int]:
    """Lesion counts with the ISBI 2015 definitions.

    A reference lesion is *detected* if any of its voxels is in the prediction; a predicted
    lesion is a *false positive* if none of its voxels is in the reference.
    Returns ``n_ref_lesions``, ``n_pred_lesions``, ``n_detected_ref_lesions`` and
    ``n_fp_pred_lesions``.
    """
    p, r = _pair(pred, ref)
    ref_labels, n_ref = label_lesions(r, connectivity)
    pred_labels, n_pred = label_lesions(p, connectivity)
    overlap = p & r
    n_detected = int(np.unique(ref_labels[overlap]).size)
    n_tp_pred = int(np.unique(pred_labels[overlap]).size)
    return {
        "n_ref_lesions": n_ref,
        "n_pred_lesions": n_pred,
        "n_detected_ref_lesions": n_detected,
        "n_fp_pred_lesions": n_pred - n_tp_pred,
    }


#: Lesion size classes (mm³) for detection by size: below 10 mm³ (a few voxels at 1 mm, under the
#: 3 mm diameter that MRI criteria count as a lesion), small, medium, large, confluent.
SIZE_EDGES_MM3 = (10.0, 50.0, 200.0, 1000.0)
_COUNT_KEYS = ("n_ref_lesions", "n_detected_ref_lesions", "n_pred_lesions", "n_fp_pred_lesions")


def lesion_counts_by_size(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float],
                          edges_mm3: Sequence[float] = SIZE_EDGES_MM3, connectivity: int = 26) -> list[dict[str, int]]:
    """:func:`lesion_counts` split by lesion volume: one dict per size class.

    Class ``i`` holds lesions of at least ``edges_mm3[i-1]`` and below ``edges_mm3[i]`` mm³ (the first class
    starts at 0, the last is open). A reference lesion counts in the class of its own volume
    (``n_ref_lesions``, ``n_detected_ref_lesions``), a predicted lesion in that of its own volume
    (``n_pred_lesions``, ``n_fp_pred_lesions``), detection and false positives as in :func:`lesion_counts`.
    """
    p, r = _pair(pred, ref)
    edges = np.asarray(edges_mm3, dtype=np.float64)
    if edges.ndim != 1 or not np.all(np.isfinite(edges)) or np.any(edges <= 0) or np.any(np.diff(edges) <= 0):
        raise ValueError(f"lesion size edges must be increasing positive numbers, got {edges_mm3!r}")
    voxel_mm3 = float(np.prod(_spacing(spacing, p.ndim)))
    overlap = p & r
    out = [dict.fromkeys(_COUNT_KEYS, 0) for _ in range(edges.size + 1)]
    for mask, total, hit_key, hit_flag in ((r, "n_ref_lesions", "n_detected_ref_lesions", True),
                                           (p, "n_pred_lesions", "n_fp_pred_lesions", False)):
        labels, n = label_lesions(mask, connectivity)
        if n == 0:
            continue
        size_class = np.searchsorted(edges, np.bincount(labels.ravel())[1:] * voxel_mm3, side="right")
        touched = np.zeros(n + 1, dtype=bool)
        touched[labels[overlap]] = True
        hit = touched[1:] if hit_flag else ~touched[1:]  # detected reference lesions; unmatched predicted ones
        for k in range(edges.size + 1):
            out[k][total] += int(np.count_nonzero(size_class == k))
            out[k][hit_key] += int(np.count_nonzero(hit & (size_class == k)))
    return out


def pool_counts_by_size(per_scan: Sequence[Sequence[Mapping[str, int]]],
                        edges_mm3: Sequence[float] = SIZE_EDGES_MM3) -> list[dict[str, float | int | None]]:
    """Sum :func:`lesion_counts_by_size` over scans; per class add ``from_mm3``/``to_mm3`` (None: open),
    ``ltpr`` (detected / reference lesions) and ``fp_fraction`` (false positives / predicted lesions),
    each None where its class holds no lesion (a rate of nothing is not 0 or 1)."""
    bounds = [0.0, *map(float, edges_mm3), None]
    pooled = []
    for k in range(len(bounds) - 1):
        sums = {key: int(sum(scan[k][key] for scan in per_scan)) for key in _COUNT_KEYS}
        pooled.append({
            "from_mm3": bounds[k], "to_mm3": bounds[k + 1], **sums,
            "ltpr": sums["n_detected_ref_lesions"] / sums["n_ref_lesions"] if sums["n_ref_lesions"] else None,
            "fp_fraction": sums["n_fp_pred_lesions"] / sums["n_pred_lesions"] if sums["n_pred_lesions"] else None,
        })
    return pooled


def _lesion_rates(counts: Mapping[str, int]) -> dict[str, float]:
    n_ref, n_pred = counts["n_ref_lesions"], counts["n_pred_lesions"]
    both_empty = n_ref == 0 and n_pred == 0
    ltpr_ = _ratio(counts["n_detected_ref_lesions"], n_ref, both_empty)
    lesion_ppv = _ratio(n_pred - counts["n_fp_pred_lesions"], n_pred, both_empty)
    f1 = 0.0 if lesion_ppv + ltpr_ == 0 else 2 * lesion_ppv * ltpr_ / (lesion_ppv + ltpr_)
    return {"ltpr": ltpr_, "lfpr": 1.0 - lesion_ppv, "lesion_f1": f1}


def ltpr(pred: np.ndarray, ref: np.ndarray, connectivity: int = 26) -> float:
    """Lesion TPR: detected reference lesions / reference lesions (empty rules in module doc)."""
    return _lesion_rates(lesion_counts(pred, ref, connectivity))["ltpr"]


def lfpr(pred: np.ndarray, ref: np.ndarray, connectivity: int = 26) -> float:
    """Lesion FPR: false-positive predicted lesions / predicted lesions (= 1 - lesion precision)."""
    return _lesion_rates(lesion_counts(pred, ref, connectivity))["lfpr"]


def lesion_f1(pred: np.ndarray, ref: np.ndarray, connectivity: int = 26) -> float:
    """Harmonic mean of lesion precision (1 - LFPR) and LTPR; 0 when both are 0."""
    return _lesion_rates(lesion_counts(pred, ref, connectivity))["lesion_f1"]


# ---------------------------------------------------------------------------- volume
def volume_ml(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Foreground volume in millilitres (1 mL = 1000 mm³)."""
    mask = np.asarray(mask)
    sp = _spacing(spacing, mask.ndim)
    return float(np.count_nonzero(mask)) * float(np.prod(sp)) / 1000.0


def abs_volume_diff_ml(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """|V(pred) - V(ref)| in millilitres."""
    p, r = _pair(pred, ref)
    return abs(volume_ml(p, spacing) - volume_ml(r, spacing))


# ---------------------------------------------------------------------------- distance
def _surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour outside the mask (the array edge counts as outside)."""
    eroded = ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(3, 1),
                                    border_value=0)
    return mask & ~eroded


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Distances in mm from each pred surface voxel to the nearest ref surface voxel, and back.

    Both masks must be non-empty. Surfaces come from a 6-connected erosion (scipy.ndimage); the
    nearest-neighbour distances are exact Euclidean ones in physical space (a k-d tree on the
    surface voxel centres scaled by ``spacing``), which is far cheaper than a full-volume distance
    transform when lesions are small and scattered.
    """
    from scipy.spatial import cKDTree  # here, not at the top: `predict` imports this module and needs no k-d tree

    p, r = _pair(pred, ref)
    sp = np.asarray(_spacing(spacing, p.ndim))
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks")
    box = ndimage.find_objects((p | r).astype(np.uint8))[0]
    p_pts = np.argwhere(_surface(p[box])) * sp
    r_pts = np.argwhere(_surface(r[box])) * sp
    d_pr = cKDTree(r_pts).query(p_pts, k=1)[0]
    d_rp = cKDTree(p_pts).query(r_pts, k=1)[0]
    return np.asarray(d_pr, dtype=np.float64), np.asarray(d_rp, dtype=np.float64)


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm between the mask surfaces.

    The larger of the two directed 95th percentiles (pred→ref and ref→pred). 0.0 when both masks
    are empty; NaN when exactly one is empty (undefined: average with NaN skipped and count it).
    """
    p, r = _pair(pred, ref)
    if not p.any() and not r.any():
        return 0.0
    if not p.any() or not r.any():
        return math.nan
    d_pr, d_rp = surface_distances(p, r, spacing)
    return float(max(np.percentile(d_pr, 95), np.percentile(d_rp, 95)))


# ---------------------------------------------------------------------------- slice-level Dice
def slice_dice(pred: np.ndarray, ref: np.ndarray, axis: int = 2) -> float:
    """Mean over the 2D slices along ``axis`` of per-slice Dice, as the original study computed it.

    A slice empty in both masks counts as Dice 1 and is included in the mean, so on brains where
    most slices hold no lesion this usually reads higher than volume-level :func:`dice`; a false
    positive on a lesion-free slice scores that slice 0.
    """
    p, r = _pair(pred, ref)
    other = tuple(a for a in range(p.ndim) if a != axis % p.ndim)
    tp = np.count_nonzero(p & r, axis=other).astype(np.float64)
    den = (np.count_nonzero(p, axis=other) + np.count_nonzero(r, axis=other)).astype(np.float64)
    per_slice = np.where(den == 0, 1.0, 2.0 * tp / np.where(den == 0, 1.0, den))
    return float(per_slice.mean())


# ---------------------------------------------------------------------------- per case
def case_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Sequence[float], connectivity: int = 26,
                 slice_axis: int = 2, counts_by_size: Sequence[Mapping[str, int]] | None = None) -> dict[str, float]:
    """Every per-case metric in one dict (python floats/ints/bools, NaN where undefined).

    Keys: dice, iou, precision, recall, ltpr, lfpr, lesion_f1, n_ref_lesions, n_pred_lesions,
    n_detected_ref_lesions, n_fp_pred_lesions, ref_volume_ml, pred_volume_ml, abs_volume_diff_ml,
    hd95_mm, slice_dice_study, ref_empty, pred_empty. ``counts_by_size``: this pair's
    :func:`lesion_counts_by_size` (same connectivity) where the caller has it already; the lesion counts are its
    sums, and the lesions are not labelled a second time.
    """
    p, r = _pair(pred, ref)
    counts = lesion_counts(p, r, connectivity) if counts_by_size is None else \
        {key: int(sum(c[key] for c in counts_by_size)) for key in _COUNT_KEYS}
    ref_ml, pred_ml = volume_ml(r, spacing), volume_ml(p, spacing)
    out: dict[str, float] = {
        "dice": dice(p, r),
        "iou": iou(p, r),
        "precision": precision(p, r),
        "recall": recall(p, r),
        **_lesion_rates(counts),
        **counts,
        "ref_volume_ml": ref_ml,
        "pred_volume_ml": pred_ml,
        "abs_volume_diff_ml": abs(pred_ml - ref_ml),
        "hd95_mm": hd95(p, r, spacing),
        "slice_dice_study": slice_dice(p, r, slice_axis),
        "ref_empty": not r.any(),
        "pred_empty": not p.any(),
    }
    return out


# ---------------------------------------------------------------------------- over scans
def volume_correlation(pred_volumes: Sequence[float], ref_volumes: Sequence[float]) -> float:
    """Pearson correlation of predicted and reference lesion volumes across scans.

    NaN when undefined: fewer than 2 scans, or zero variance on either side.
    """
    x = np.asarray(pred_volumes, dtype=np.float64)
    y = np.asarray(ref_volumes, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError("need two equal-length 1D sequences of volumes")
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    if den == 0 or not math.isfinite(den):
        return math.nan
    return float(np.clip(float(dx @ dy) / den, -1.0, 1.0))


def isbi_score(rows: Sequence[Mapping[str, float]]) -> dict[str, float | str | None]:
    """The ISBI 2015 score for one set of scans (one rater).

    ``SC = mean over scans of (Dice/8 + PPV/8 + (1-LFPR)/4 + LTPR/4) + Corr/4``, with Corr the
    Pearson correlation of predicted and reference lesion volumes across the scans. Each row needs
    the :func:`case_metrics` keys dice, precision, lfpr, ltpr, pred_volume_ml, ref_volume_ml.

    Rule: when Corr is undefined (fewer than 2 scans or zero volume variance) the score is NaN and
    ``reason`` says why; ``partial`` always holds the mean of the per-scan terms (max 0.75).
    Returns ``{"score", "volume_correlation", "partial", "reason"}`` (reason None when defined).
    """
    if not rows:
        return {"score": math.nan, "volume_correlation": math.nan, "partial": math.nan,
                "reason": "no scans"}
    terms = [r["dice"] / 8 + r["precision"] / 8 + (1 - r["lfpr"]) / 4 + r["ltpr"] / 4 for r in rows]
    partial = float(np.mean(terms))
    corr = volume_correlation([r["pred_volume_ml"] for r in rows], [r["ref_volume_ml"] for r in rows])
    if math.isnan(corr):
        reason = ("volume correlation undefined with fewer than 2 scans" if len(rows) < 2
                  else "volume correlation undefined: predicted or reference volumes do not vary")
        return {"score": math.nan, "volume_correlation": corr, "partial": partial, "reason": reason}
    return {"score": partial + corr / 4, "volume_correlation": corr, "partial": partial, "reason": None}
