"""Longitudinal change between two co-registered lesion masks: new, enlarging, stable, shrinking, gone.

A lesion is a 26-connected component (the same definition as :mod:`mslpipe.metrics`). Every lesion
of the **follow-up** mask is classified against the **baseline** mask:

* **new** (label 3): it overlaps no baseline lesion;
* otherwise its volume ``V1`` is compared with ``V0``, its share of the baseline lesions it overlaps: each
  baseline lesion's volume is shared among the follow-up lesions it overlaps in proportion to the voxels it
  shares with each (lesions that merged add up; the parts of a lesion that split share its volume, so that the
  rows' changes add up to the lesions' change, not to a multiple of it), ``change = V1 - V0``:

  * **enlarging** (label 2): ``change >= min_growth_mm3`` **and** ``change >= min_growth_fraction * V0``;
  * **shrinking** (label 4): the same thresholds the other way, ``-change >= min_growth_mm3`` and
    ``-change >= min_growth_fraction * V0``;
  * **stable** (label 1): everything in between.

A baseline lesion that overlaps no follow-up lesion has **disappeared** (label 5 marks its baseline
voxels in the change mask; they are not foreground in the follow-up), unless part of it lies outside the
follow-up's field of view (``coverage``, from a registration): then it is **outside** (label 6), not seen
again rather than gone.

Defaults: ``min_growth_fraction = 0.25`` (25 % of the baseline volume) and ``min_growth_mm3 = 10``
(10 mm³, ten 1 mm³ voxels): both must hold, so a 2-voxel lesion gaining 2 voxels (+100 %) is not called
enlarging, and neither is a 5 mL lesion gaining 20 mm³ (+0.4 %).

Change mask labels (uint8 NIfTI on the follow-up's grid)::

    0 background, 1 stable, 2 enlarging, 3 new, 4 shrinking, 5 disappeared (baseline voxels),
    6 outside the follow-up's field of view (baseline voxels)

Where the masks come with the probability maps they were thresholded from (``predict --save-probabilities``,
which ``compare`` asks for when it segments two images), every lesion's row carries its ``mean_probability``:
a new lesion near 0.5 is the first to doubt.

The two masks must share one grid (same shape, affines equal within 1e-3). Two FLAIR images from two
visits are aligned first by ``compare --register`` (:mod:`mslpipe.registration`, rigid), which compares the
follow-up's mask on the baseline grid.

API::

    load_pair(baseline, followup) -> (baseline mask, followup mask, affine)
    compare_masks(baseline, followup, affine, ...) -> Change     # arrays in memory
    compare_files(baseline, followup, out, ...) -> Change        # files in, change mask + CSV + JSON out
    write_change(change, out, ...) -> dict[str, Path]
"""

from __future__ import annotations

import csv
import io as _io
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_write_text, load_image, save_nifti, saved_probability, write_json
from mslpipe.metrics import label_lesions
from mslpipe.postprocess import lesion_table

log = logging.getLogger(__name__)

STABLE, ENLARGING, NEW, SHRINKING, DISAPPEARED, OUTSIDE = 1, 2, 3, 4, 5, 6
LABELS = {0: "background", STABLE: "stable", ENLARGING: "enlarging", NEW: "new", SHRINKING: "shrinking",
          DISAPPEARED: "disappeared", OUTSIDE: "outside"}
DEFAULT_MIN_GROWTH_FRACTION = 0.25
DEFAULT_MIN_GROWTH_MM3 = 10.0
GEOMETRY_ATOL = 1e-3
CSV_COLUMNS = ("lesion", "status", "scan", "baseline_lesions", "followup_lesions", "n_voxels",
               "volume_baseline_mm3", "volume_followup_mm3", "change_mm3", "change_percent",
               "centroid_i", "centroid_j", "centroid_k", "centroid_x_mm", "centroid_y_mm", "centroid_z_mm",
               "mean_probability")


@dataclass
class Change:
    """The result of a comparison: the change mask, one row per lesion and a summary."""

    mask: np.ndarray
    affine: np.ndarray
    lesions: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------- inputs
def read_mask(path: str | Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(uint8 mask, affine) if the file holds only 0 and 1, ``None`` if it holds other values (an image)."""
    data, affine = load_image(path)
    if not np.isin(np.unique(data), (0.0, 1.0)).all():
        return None
    return data.astype(np.uint8), affine


def check_same_grid(shape_a, affine_a, shape_b, affine_b, path_a: object, path_b: object) -> None:
    """Refuse two scans on different grids, naming both files."""
    if tuple(shape_a) != tuple(shape_b):
        raise MslpipeError(f"baseline {path_a} has shape {tuple(shape_a)} but follow-up {path_b} has "
                           f"{tuple(shape_b)}: scans must be co-registered onto one grid first "
                           "(two FLAIR images from two visits: `compare --register` aligns them)")
    diff = float(np.max(np.abs(np.asarray(affine_a, dtype=float) - np.asarray(affine_b, dtype=float))))
    if not diff <= GEOMETRY_ATOL:
        raise MslpipeError(f"baseline {path_a} and follow-up {path_b} have different affines (largest "
                           f"difference {diff:.4g} > {GEOMETRY_ATOL}): scans must be co-registered onto one "
                           "grid first (two FLAIR images from two visits: `compare --register` aligns them)")


def load_pair(baseline: str | Path, followup: str | Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Load two binary masks on one grid; refuse images (non-binary values) and mismatched grids."""
    pair = []
    for path in (baseline, followup):
        loaded = read_mask(path)
        if loaded is None:
            raise MslpipeError("not a lesion mask (values other than 0 and 1); give 0/1 masks, or a model "
                               "(-d NAME or --checkpoint PATH) to segment FLAIR images first", path)
        pair.append(loaded)
    (m0, a0), (m1, a1) = pair
    check_same_grid(m0.shape, a0, m1.shape, a1, baseline, followup)
    return m0, m1, a1


# ---------------------------------------------------------------------------- the comparison
def _check_thresholds(min_growth_fraction: float, min_growth_mm3: float) -> None:
    for name, value in (("min_growth_fraction", min_growth_fraction), ("min_growth_mm3", min_growth_mm3)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise MslpipeError(f"{name} must be a finite number >= 0, got {value!r}")


def classify(v0: float, v1: float, min_growth_fraction: float, min_growth_mm3: float) -> int:
    """The label of a follow-up lesion of volume ``v1`` overlapping baseline lesions of volume ``v0``."""
    change = v1 - v0
    if change > 0 and change >= min_growth_mm3 and change >= min_growth_fraction * v0:
        return ENLARGING
    if change < 0 and -change >= min_growth_mm3 and -change >= min_growth_fraction * v0:
        return SHRINKING
    return STABLE


def _row(table_row: dict, status: int, scan: str, base_ids, follow_ids, v0: float, v1: float) -> dict:
    change = v1 - v0
    return {
        "lesion": table_row["label"],
        "status": LABELS[status],
        "scan": scan,
        "baseline_lesions": [int(i) for i in base_ids],
        "followup_lesions": [int(i) for i in follow_ids],
        "n_voxels": table_row["n_voxels"],
        "volume_baseline_mm3": v0,
        "volume_followup_mm3": v1,
        "change_mm3": change,
        "change_percent": 100.0 * change / v0 if v0 > 0 else None,
        "centroid_voxel": table_row["centroid_voxel"],
        "centroid_mm": table_row["centroid_mm"],
        "mean_probability": table_row.get("mean_probability"),
    }


def compare_masks(baseline: np.ndarray, followup: np.ndarray, affine: np.ndarray, *,
                  min_growth_fraction: float = DEFAULT_MIN_GROWTH_FRACTION,
                  min_growth_mm3: float = DEFAULT_MIN_GROWTH_MM3, connectivity: int = 26,
                  mark_disappeared: bool = True,
                  probabilities: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
                  coverage: np.ndarray | None = None) -> Change:
    """Classify every follow-up lesion and find the baseline lesions that disappeared.

    ``baseline`` and ``followup`` are masks on one grid (non-zero is lesion); ``affine`` gives the voxel
    volume and the world coordinates of the centroids. ``probabilities``: the lesion probability maps the masks
    were thresholded from (baseline, follow-up; either may be None): each row then has its lesion's
    ``mean_probability`` on its own scan (the follow-up's for its lesions, the baseline's for disappeared ones),
    else None. ``coverage``: the voxels the follow-up's field of view reaches (None: all); a baseline lesion without
    a follow-up partner that reaches beyond it is ``outside``, not ``disappeared``.
    """
    _check_thresholds(min_growth_fraction, min_growth_mm3)
    base = np.asarray(baseline) != 0
    follow = np.asarray(followup) != 0
    if base.shape != follow.shape or base.ndim != 3:
        raise MslpipeError(f"masks must be 3D and of one shape, got {base.shape} and {follow.shape}")
    affine = np.asarray(affine, dtype=np.float64)
    voxel_mm3 = abs(float(np.linalg.det(affine[:3, :3])))
    base_labels, n_base = label_lesions(base, connectivity)
    follow_labels, n_follow = label_lesions(follow, connectivity)
    try:
        base_table = lesion_table(base, affine, connectivity, probability=probabilities[0])
        follow_table = lesion_table(follow, affine, connectivity, probability=probabilities[1])
    except ValueError as exc:  # a probability map on another grid
        raise MslpipeError(str(exc)) from exc
    base_vol = np.array([0.0] + [r["volume_mm3"] for r in base_table])

    # every (follow-up lesion, baseline lesion) pair that shares at least one voxel, and how many
    both = base & follow
    pairs, shared = np.unique(np.stack([follow_labels[both], base_labels[both]]), axis=1, return_counts=True) \
        if both.any() else (np.zeros((2, 0), dtype=np.int64), np.zeros(0, dtype=np.int64))
    partners_of_follow: dict[int, list[int]] = {i: [] for i in range(1, n_follow + 1)}
    partners_of_base: dict[int, list[int]] = {i: [] for i in range(1, n_base + 1)}
    base_share = np.zeros(n_follow + 1)  # V0 of each follow-up lesion: its shares of the baseline lesions
    shared_of_base = np.bincount(pairs[1], weights=shared, minlength=n_base + 1)
    for (f, b), n in zip(pairs.T, shared, strict=True):
        partners_of_follow[int(f)].append(int(b))
        partners_of_base[int(b)].append(int(f))
        base_share[f] += base_vol[b] * n / shared_of_base[b]

    status_of = np.zeros(n_follow + 1, dtype=np.uint8)
    rows = []
    for row in follow_table:
        f = row["label"]
        bases = partners_of_follow[f]
        v1 = row["volume_mm3"]
        v0 = float(base_share[f]) if bases else 0.0
        status = classify(v0, v1, min_growth_fraction, min_growth_mm3) if bases else NEW
        status_of[f] = status
        rows.append(_row(row, status, "followup", bases, [f], v0, v1))
    change = status_of[follow_labels]
    unseen = set() if coverage is None else {int(i) for i in np.unique(base_labels[~np.asarray(coverage, bool)])} - {0}
    for status in (DISAPPEARED, OUTSIDE):
        gone = [row for row in base_table if not partners_of_base[row["label"]]
                and (row["label"] in unseen) == (status == OUTSIDE)]
        rows += [_row(row, status, "baseline", [row["label"]], [], row["volume_mm3"], 0.0) for row in gone]
        if mark_disappeared and gone:
            change[np.isin(base_labels, [row["label"] for row in gone])] = status

    counts = {name: sum(r["status"] == name for r in rows) for name in list(LABELS.values())[1:]}
    # within the follow-up's view: like with like (the baseline's lesion voxels beyond it are counted apart)
    vol_base = float((base if coverage is None else base & np.asarray(coverage, bool)).sum()) * voxel_mm3
    vol_follow = float(follow.sum()) * voxel_mm3
    summary = {
        "n_baseline_lesions": n_base,
        "n_followup_lesions": n_follow,
        "counts": counts,
        "volume_baseline_ml": vol_base / 1000.0,
        "volume_followup_ml": vol_follow / 1000.0,
        "volume_change_ml": (vol_follow - vol_base) / 1000.0,
        "volume_change_percent": 100.0 * (vol_follow - vol_base) / vol_base if vol_base > 0 else None,
        "volume_new_ml": sum(r["volume_followup_mm3"] for r in rows if r["status"] == "new") / 1000.0,
        "volume_disappeared_ml": sum(r["volume_baseline_mm3"] for r in rows if r["status"] == "disappeared")
        / 1000.0,
        "volume_outside_ml": sum(r["volume_baseline_mm3"] for r in rows if r["status"] == "outside") / 1000.0,
        "volume_baseline_beyond_view_ml": float(base.sum()) * voxel_mm3 / 1000.0 - vol_base / 1000.0,
        "voxel_mm3": voxel_mm3,
        "thresholds": {"min_growth_fraction": float(min_growth_fraction), "min_growth_mm3": float(min_growth_mm3),
                       "rule": "enlarging if change >= min_growth_mm3 and change >= min_growth_fraction * "
                               "baseline volume; shrinking the same way down; stable otherwise"},
        "connectivity": connectivity,
        "mean_probability": {"baseline": probabilities[0] is not None, "followup": probabilities[1] is not None},
        "labels": {str(k): v for k, v in LABELS.items() if mark_disappeared or k not in (DISAPPEARED, OUTSIDE)},
    }
    return Change(change.astype(np.uint8), affine, rows, summary)


# ---------------------------------------------------------------------------- outputs
def _csv_text(rows: list[dict]) -> str:
    buf = _io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)

    def num(v):
        return "" if v is None else f"{v:.4f}" if isinstance(v, float) else v

    for r in rows:
        writer.writerow([r["lesion"], r["status"], r["scan"], ";".join(map(str, r["baseline_lesions"])),
                         ";".join(map(str, r["followup_lesions"])), r["n_voxels"],
                         *(num(r[k]) for k in ("volume_baseline_mm3", "volume_followup_mm3", "change_mm3",
                                               "change_percent")),
                         *(f"{v:.2f}" for v in r["centroid_voxel"]), *(f"{v:.2f}" for v in r["centroid_mm"]),
                         num(r.get("mean_probability"))])
    return buf.getvalue()


def write_change(change: Change, out: str | Path, extra: dict | None = None) -> dict[str, Path]:
    """Write ``change_mask.nii.gz``, ``lesions.csv`` and ``summary.json`` into ``out`` (atomically)."""
    out = Path(out)
    paths = {"mask": out / "change_mask.nii.gz", "csv": out / "lesions.csv", "summary": out / "summary.json"}
    save_nifti(paths["mask"], change.mask, change.affine, dtype=np.uint8)
    atomic_write_text(paths["csv"], _csv_text(change.lesions))
    summary = {**(extra or {}), **change.summary, "lesions": change.lesions,
               "outputs": {k: p.name for k, p in paths.items()}}
    write_json(paths["summary"], summary)
    return paths


def compare_files(baseline: str | Path, followup: str | Path, out: str | Path, *,
                  min_growth_fraction: float = DEFAULT_MIN_GROWTH_FRACTION,
                  min_growth_mm3: float = DEFAULT_MIN_GROWTH_MM3, connectivity: int = 26,
                  extra: dict | None = None, followup_probability: np.ndarray | None = None,
                  coverage: np.ndarray | None = None) -> Change:
    """Compare two mask files and write the change mask, the CSV and the JSON summary into ``out``.

    Each lesion's mean probability comes from the map ``predict --save-probabilities`` wrote beside its mask
    (``probabilities/<case>.nii.gz``), where there is one; ``followup_probability`` replaces the follow-up's (a
    map moved onto the baseline grid with its mask). ``coverage``: :func:`compare_masks`'."""
    m0, m1, affine = load_pair(baseline, followup)
    maps = (saved_probability(baseline, m0.shape),
            followup_probability if followup_probability is not None else saved_probability(followup, m1.shape))
    change = compare_masks(m0, m1, affine, min_growth_fraction=min_growth_fraction,
                           min_growth_mm3=min_growth_mm3, connectivity=connectivity, probabilities=maps,
                           coverage=coverage)
    info = {"baseline": str(baseline), "followup": str(followup), **(extra or {})}
    write_change(change, out, info)
    log.info("%s → %s: %s", baseline, followup, change.summary["counts"])
    return change
