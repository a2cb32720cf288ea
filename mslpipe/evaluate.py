"""Score predicted lesion masks against one or more raters' reference masks.

``run_folders(pred_dir, ref_dir)`` matches files by case name, scores every (case, rater) pair
with :func:`mslpipe.metrics.case_metrics`, writes ``summary.json`` atomically and returns the
summary. Undefined values (NaN, e.g. HD95 with one empty side) are written as ``null`` and skipped
in the means, which report how many rows they skipped. No case is ever dropped silently.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mslpipe.errors import MslpipeError
from mslpipe.io import axial_axis, is_nifti, load_mask, strip_nifti_suffix, write_json
from mslpipe.metrics import (
    EMPTY_CASE_RULES,
    SLICE_DICE_NOTE,
    case_metrics,
    connectivity_structure,
    dice,
    isbi_score,
    lesion_counts_by_size,
    lesion_f1,
    pool_counts_by_size,
)
from mslpipe.postprocess import remove_small_components
from mslpipe.tables import name_list

log = logging.getLogger(__name__)

SUMMARY_NAME = "summary.json"

#: Per-case metrics that are averaged (in this order) in ``summary["mean"]``.
MEAN_KEYS = (
    "dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "n_ref_lesions",
    "n_pred_lesions", "ref_volume_ml", "pred_volume_ml", "abs_volume_diff_ml", "hd95_mm",
    "slice_dice_study",
)
_ROW_EXTRA = ("n_detected_ref_lesions", "n_fp_pred_lesions", "ref_empty", "pred_empty")

RULES = {
    "empty_cases": EMPTY_CASE_RULES,
    "slice_dice_study": SLICE_DICE_NOTE,
    "means": "Means are over all (case, rater) rows; undefined values (null) are skipped and "
             "counted in mean_skipped.",
    "isbi_score": "SC = mean over scans of (Dice/8 + PPV/8 + (1-LFPR)/4 + LTPR/4) + Corr/4, Corr = "
                  "Pearson correlation of predicted and reference lesion volumes across scans; "
                  "computed per rater and averaged over raters. When Corr is undefined (fewer than "
                  "2 scans or no volume variance) the score is null and isbi_score_reason says why.",
    "lesions_by_size": "Lesion detection by lesion volume, summed over all (case, rater) rows (per_rater: that "
                       "rater's rows): a reference lesion counts in the size class of its own volume and is detected "
                       "when any voxel of it is predicted; a predicted lesion counts in the class of its own volume "
                       "and is a false positive when no voxel of it is in the reference. ltpr and fp_fraction are "
                       "null where the class holds no lesion.",
    "raters": "With several reference masks per case (CASE_mask1, CASE_mask2, ...) each scan is "
              "scored against each rater: one per_case row per (case, rater), rater 1-based.",
}

_RATER_RE = re.compile(r"^(?P<case>.+)_mask(?P<rater>\d+)$")


class CasePair(NamedTuple):
    """One case to score: its prediction and one reference mask per rater."""

    case: str
    pred_path: Path
    ref_paths: list[Path]


# ---------------------------------------------------------------------------- loading
def _as_pair(pair) -> CasePair:
    if hasattr(pair, "pred_path") and hasattr(pair, "ref_paths"):
        case, pred, refs = pair.case, pair.pred_path, pair.ref_paths
    else:
        case, pred, refs = pair
    if isinstance(refs, str | os.PathLike):
        refs = [refs]
    refs = [Path(r) for r in refs]
    if not refs:
        raise MslpipeError(f"case {case!r} has no reference mask", pred)
    return CasePair(str(case), Path(pred), refs)


def _header_affine(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).affine, dtype=np.float64)


def _resolve_spacing(spacing_from, ref_affine: np.ndarray, pred_affine: np.ndarray) -> tuple[float, ...]:
    if isinstance(spacing_from, str):
        if spacing_from not in ("ref", "pred"):
            raise MslpipeError(f"spacing_from must be 'ref', 'pred' or 3 numbers, got {spacing_from!r}")
        affine = ref_affine if spacing_from == "ref" else pred_affine
        return tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
    spacing = tuple(float(s) for s in spacing_from)
    if len(spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in spacing):
        raise MslpipeError(f"spacing must be 3 positive numbers, got {spacing_from!r}")
    return spacing


def _load_case(pair: CasePair, spacing_from="ref") -> tuple[np.ndarray, list[np.ndarray], tuple]:
    """Load (pred, refs, spacing); every mask must be binary and on the first reference's grid."""
    first = load_mask(pair.ref_paths[0])
    affine = _header_affine(pair.ref_paths[0])
    refs = [first] + [load_mask(p, like_shape=first.shape, like_affine=affine) for p in pair.ref_paths[1:]]
    pred = load_mask(pair.pred_path, like_shape=first.shape, like_affine=affine)
    pred_affine = _header_affine(pair.pred_path) if spacing_from == "pred" else affine
    return pred, refs, _resolve_spacing(spacing_from, affine, pred_affine)


# ---------------------------------------------------------------------------- scoring
def _clean(value):
    """numpy scalars → python; NaN/inf → None (JSON has no NaN)."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _means(rows: Sequence[dict]) -> tuple[dict, dict]:
    means, skipped = {}, {}
    for key in MEAN_KEYS:
        values = [r[key] for r in rows if r.get(key) is not None]
        means[key] = float(np.mean(values)) if values else None
        skipped[key] = len(rows) - len(values)
    return means, skipped


def _isbi_for(rows: Sequence[dict]) -> dict:
    result = isbi_score(rows)  # the per-scan terms and volumes are always defined (never None)
    return {k: _clean(v) for k, v in result.items()}


def score_pairs(pairs: Iterable, spacing_from="ref", connectivity: int = 26, slice_axis: int | None = None) -> dict:
    """Score each prediction against each of its raters; return the summary dict (JSON-ready).

    ``pairs``: :class:`CasePair` or ``(case, pred_path, ref_paths)`` tuples. ``spacing_from``:
    ``"ref"`` or ``"pred"`` (voxel size from that file's affine) or three numbers in mm. ``slice_axis``: the
    array axis ``slice_dice_study`` slices along; by default each scan's axial one (closest to world S-I).
    Raises :class:`MslpipeError` naming the file for an unreadable, non-binary or off-grid mask.
    """
    pairs = [_as_pair(p) for p in pairs]
    if not pairs:
        raise MslpipeError("no cases to score")
    connectivity_structure(connectivity)  # validate before any loading
    rows: list[dict] = []
    for pair in pairs:
        pred, refs, spacing = _load_case(pair, spacing_from)
        axis = axial_axis(_header_affine(pair.ref_paths[0])) if slice_axis is None else slice_axis
        for rater, (ref, ref_path) in enumerate(zip(refs, pair.ref_paths, strict=True), start=1):
            by_size = lesion_counts_by_size(pred, ref, spacing, connectivity=connectivity)
            m = case_metrics(pred, ref, spacing, connectivity=connectivity, slice_axis=axis,
                             counts_by_size=by_size)
            row = {"case": pair.case, "rater": rater, "ref_file": ref_path.name}
            row.update({k: _clean(m[k]) for k in MEAN_KEYS + _ROW_EXTRA})
            row["lesions_by_size"] = by_size
            rows.append(row)
        log.info("scored %s against %d rater(s)", pair.case, len(refs))

    means, skipped = _means(rows)
    per_rater = []
    for rater in sorted({r["rater"] for r in rows}):
        sub = [r for r in rows if r["rater"] == rater]
        r_means, r_skipped = _means(sub)
        isbi = _isbi_for(sub)
        per_rater.append({
            "rater": rater, "n_cases": len(sub), "mean": r_means, "mean_skipped": r_skipped,
            "isbi_score": isbi["score"], "isbi_score_reason": isbi["reason"],
            "volume_correlation": isbi["volume_correlation"], "isbi_per_scan_part": isbi["partial"],
            "lesions_by_size": pool_counts_by_size([r["lesions_by_size"] for r in sub]),
        })
    scores = [p["isbi_score"] for p in per_rater]
    corrs = [p["volume_correlation"] for p in per_rater]
    reasons = [f"rater {p['rater']}: {p['isbi_score_reason']}" for p in per_rater if p["isbi_score_reason"]]
    if len(per_rater) == 1 and reasons:
        reasons = [per_rater[0]["isbi_score_reason"]]
    summary = {
        "per_case": rows,
        "mean": means,
        "mean_skipped": skipped,
        "per_rater": per_rater,
        "isbi_score": None if None in scores else float(np.mean(scores)),
        "isbi_score_reason": "; ".join(reasons) or None,
        "volume_correlation": None if None in corrs else float(np.mean(corrs)),
        # the score's per-scan terms alone (at most 0.75): defined for any number of scans
        "isbi_per_scan_part": float(np.mean([p["isbi_per_scan_part"] for p in per_rater])) if per_rater else None,
        "lesions_by_size": pool_counts_by_size([r["lesions_by_size"] for r in rows]),
        "n_cases": len(pairs),
        "n_raters": len(per_rater),
        "n_rows": len(rows),
        "n_empty_ref": sum(r["ref_empty"] for r in rows),
        "n_empty_pred": sum(r["pred_empty"] for r in rows),
        "n_empty_both": sum(r["ref_empty"] and r["pred_empty"] for r in rows),
        "connectivity": connectivity,
        "slice_axis": "axial" if slice_axis is None else slice_axis,
        "spacing_from": spacing_from if isinstance(spacing_from, str) else [float(s) for s in spacing_from],
        "rules": dict(RULES),
    }
    if summary["isbi_score_reason"]:
        log.warning("ISBI score undefined: %s", summary["isbi_score_reason"])
    return summary


# ---------------------------------------------------------------------------- folders
def _nifti_by_name(folder: Path, what: str) -> dict[str, Path]:
    if not folder.exists():
        raise MslpipeError(f"{what} folder not found", folder)
    if not folder.is_dir():
        raise MslpipeError(f"{what} path is not a folder", folder)
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not is_nifti(path) or not path.is_file():
            continue
        name = strip_nifti_suffix(path.name)
        if name in found:
            raise MslpipeError(f"two files for the name {name!r}: {found[name].name} and {path.name}", folder)
        found[name] = path
    return found


def isbi_masks(folder: Path) -> dict[str, Path]:
    """The masks anywhere in an ISBI 2015-layout tree (``.../masks/CASE_maskR.nii[.gz]``), by name."""
    found: dict[str, Path] = {}
    for path in sorted(p for p in folder.rglob("*") if p.parent.name == "masks" and is_nifti(p) and p.is_file()):
        name = strip_nifti_suffix(path.name)
        if not _RATER_RE.match(name):
            continue
        if name in found:
            raise MslpipeError(f"two files for the name {name!r}: {found[name]} and {path}", folder)
        found[name] = path
    return found


def match_folders(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike,
                  unpredicted: list[str] | None = None) -> list[CasePair]:
    """Pair predictions with references by case name (file name without .nii/.nii.gz).

    A reference named ``CASE`` is the single rater of ``CASE``; ``CASE_mask1``, ``CASE_mask2``, ...
    are several raters (ordered: an exact ``CASE`` first, then by mask number). ``ref_dir`` is a folder of
    masks, or a dataset in the ISBI 2015 layout (its root, ``training/`` or one subject's folder): its
    ``masks/`` folders are the references, and its labelled cases without a prediction are not an error but
    go to ``unpredicted`` (when a list), since a dataset is often predicted in part. Raises
    :class:`MslpipeError` for an empty prediction folder or any other unmatched name.
    """
    pred_dir, ref_dir = Path(pred_dir), Path(ref_dir)
    preds = _nifti_by_name(pred_dir, "prediction")
    refs = _nifti_by_name(ref_dir, "reference")
    if not preds:
        raise MslpipeError("no NIfTI predictions (.nii or .nii.gz) in this folder", pred_dir)
    dataset = not refs
    refs = refs or isbi_masks(ref_dir)
    if not refs:
        raise MslpipeError("no NIfTI reference masks (.nii or .nii.gz) in this folder, nor an ISBI 2015-layout "
                           "dataset's masks/ folders below it", ref_dir)
    groups: dict[str, list[tuple[int, Path]]] = {}
    for name, path in refs.items():
        m = _RATER_RE.match(name)
        if name in preds or m is None:
            groups.setdefault(name, []).append((0, path))
        else:
            groups.setdefault(m["case"], []).append((int(m["rater"]), path))
    no_ref = sorted(set(preds) - set(groups))
    no_pred = sorted(p.name for case in set(groups) - set(preds) for _, p in groups[case])
    if dataset and not no_ref and no_pred:
        left = sorted(set(groups) - set(preds))
        log.info("%d labelled case(s) in %s have no prediction and are not scored: %s", len(left), ref_dir,
                 name_list(left))
        if unpredicted is not None:
            unpredicted.extend(left)
        no_pred = []
    if no_ref or no_pred:
        parts = []
        if no_ref:
            parts.append(f"no reference in {ref_dir} for: {name_list(no_ref)}")
        if no_pred:
            parts.append(f"no prediction for reference(s): {name_list(no_pred)}")
        raise MslpipeError("unmatched cases; " + "; ".join(parts), pred_dir)
    return [CasePair(case, preds[case], [p for _, p in sorted(groups[case], key=lambda t: t[0])])
            for case in sorted(preds)]


def run_folders(pred_dir: str | os.PathLike, ref_dir: str | os.PathLike,
                out: str | os.PathLike | None = None, connectivity: int = 26, slice_axis: int | None = None,
                spacing_from="ref") -> dict:
    """Match, score, write ``summary.json`` (default ``pred_dir/summary.json``), return the summary."""
    unpredicted: list[str] = []
    pairs = match_folders(pred_dir, ref_dir, unpredicted)
    summary = score_pairs(pairs, spacing_from=spacing_from, connectivity=connectivity,
                          slice_axis=slice_axis)
    summary["pred_dir"] = str(pred_dir)
    summary["ref_dir"] = str(ref_dir)
    if unpredicted:  # a dataset as the reference: its labelled cases that were not predicted, said not dropped
        summary["unpredicted_references"] = unpredicted
    path = Path(out) if out is not None else Path(pred_dir) / SUMMARY_NAME
    write_json(path, summary)
    log.info("wrote %s (%d cases, %d rows)", path, summary["n_cases"], summary["n_rows"])
    return summary


# ---------------------------------------------------------------------------- tuning
def select_min_lesion_size(pairs: Iterable, candidates_mm3: Sequence[float] = (0, 3, 5, 10, 20),
                           connectivity: int = 26, spacing_from="ref") -> dict:
    """Pick the minimum lesion size (mm³) for :func:`remove_small_components` on these cases.

    Each candidate is applied to every prediction (in memory) and scored against every rater. A
    candidate qualifies when neither mean Dice nor mean lesion F1 falls below the 0 mm³ baseline
    (always evaluated); among those, the best mean of (Dice + lesion F1)/2 wins, ties going to
    the smaller threshold.
    """
    pairs = [_as_pair(p) for p in pairs]
    if not pairs:
        raise MslpipeError("no cases to tune the minimum lesion size on")
    connectivity_structure(connectivity)
    return choose_min_lesion_size([_load_case(p, spacing_from) for p in pairs], candidates_mm3, connectivity)


def best_candidate(scores: Sequence[tuple[float, float]]) -> int:
    """The criterion by which `evaluate` chooses postprocessing: of candidates scored (mean Dice, mean lesion F1),
    the first being no change, the index of the best mean of the two among those that lower neither below the
    first's; ties go to the earliest (candidates come in order of preference)."""
    base_dice, base_f1 = scores[0]
    tol = 1e-12
    eligible = [i for i, (d, f) in enumerate(scores) if d >= base_dice - tol and f >= base_f1 - tol]
    return max(eligible, key=lambda i: ((scores[i][0] + scores[i][1]) / 2, -i))


def choose_min_lesion_size(cases: Sequence[tuple[np.ndarray, list[np.ndarray], tuple]],
                           candidates_mm3: Sequence[float] = (0, 3, 5, 10, 20), connectivity: int = 26) -> dict:
    """:func:`select_min_lesion_size` on cases in memory: ``(prediction, [rater masks], spacing)`` each."""
    if not cases:
        raise MslpipeError("no cases to tune the minimum lesion size on")
    connectivity_structure(connectivity)
    for c in candidates_mm3:
        if not math.isfinite(float(c)) or float(c) < 0:
            raise MslpipeError(f"minimum lesion size candidates must be >= 0 mm³, got {c!r}")
    # 0 (no removal) is always the baseline; whole numbers stay ints so JSON reads "3", not "3.0"
    candidates = [int(v) if v.is_integer() else v for v in sorted({0.0, *map(float, candidates_mm3)})]
    results = []
    for size in candidates:
        dices, f1s = [], []
        for pred, refs, spacing in cases:
            cleaned = remove_small_components(pred, spacing, size, connectivity)
            for ref in refs:
                dices.append(dice(cleaned, ref))
                f1s.append(lesion_f1(cleaned, ref, connectivity))
        results.append({"min_lesion_mm3": size, "dice": float(np.mean(dices)),
                        "lesion_f1": float(np.mean(f1s))})
    base = results[0]
    best = results[best_candidate([(r["dice"], r["lesion_f1"]) for r in results])]
    if best["min_lesion_mm3"] == 0:
        because = ("no threshold raised (Dice + lesion F1)/2 without lowering Dice or lesion F1; "
                   "keeping 0 mm³ (no removal)")
    else:
        because = (f"{best['min_lesion_mm3']:g} mm³ gives the best (Dice + lesion F1)/2 = "
                   f"{(best['dice'] + best['lesion_f1']) / 2:.4f} without lowering either: Dice "
                   f"{base['dice']:.4f} → {best['dice']:.4f}, lesion F1 {base['lesion_f1']:.4f} → "
                   f"{best['lesion_f1']:.4f}")
    log.info("min lesion size: %s", because)
    return {"min_lesion_mm3": best["min_lesion_mm3"], "connectivity": connectivity,
            "candidates": results, "chosen_because": because}
