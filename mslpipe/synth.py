"""Synthetic FLAIR data sets in the ISBI 2015 layout, for tests, demos and smoke training.

:func:`make_dataset` writes skull-stripped, brain-shaped FLAIR-like volumes (white and grey
matter, folded cortex, ventricles, deep grey matter, bias field, noise, a random global scale)
with MS-like hyperintense lesions, two raters' masks and the ground truth of every lesion::

    out/training/training01/preprocessed/training01_01_flair_pp.nii.gz
    out/training/training01/masks/training01_01_mask1.nii.gz   (and _mask2 with two raters)
    out/synth_truth.json

Everything is deterministic per seed, and subject ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from mslpipe.errors import MslpipeError
from mslpipe.io import save_nifti, write_json
from mslpipe.synth_anatomy import BG, WM, Anatomy, ellipsoid, frame, make_anatomy, render_image, smoothstep_profile

log = logging.getLogger(__name__)

_LESION_CONTRAST = (0.5, 0.8)  # lesion core brightness: +50..80 % of white matter
_EDGE = 1.25  # voxels: a lesion's soft edge reaches this far beyond its mask border (inward too)
_MIN_SHAPE = 16


@dataclass(frozen=True)
class _Lesion:
    id: int
    centre: np.ndarray  # voxel coordinates, float
    radii: np.ndarray  # semi-axes along the rows of ``axes``; radii[0] is the long axis
    axes: np.ndarray  # 3×3, rows are orthonormal axis directions
    contrast: float
    edge: float  # voxels of soft edge each side of the mask border
    kind: str  # "periventricular", "confluent" or "deep"
    status: str  # "baseline", "stable", "growing" or "new"

    @property
    def support(self) -> float:
        """Normalised radius where the lesion stops brightening (its mask ends at 1)."""
        return 1.0 + self.edge / float(np.min(self.radii))

    def box(self, shape, reach: float | None = None):
        return ellipsoid(shape, self.centre, self.radii, self.axes, self.support if reach is None else reach)

    def truth(self) -> dict:
        return {
            "id": self.id,
            "status": self.status,
            "kind": self.kind,
            "centre": [float(v) for v in self.centre],  # full precision: mask1 is exactly
            "radii": [float(v) for v in self.radii],  # the union of these ellipsoids
            "axes": [[float(v) for v in row] for row in self.axes],
            "contrast": float(self.contrast),
            "edge": float(self.edge),
        }


# ---------------------------------------------------------------------------- lesions
def _fits(anat: Anatomy, lesion: _Lesion, occupied: np.ndarray | None = None, gap: float = 0.0) -> bool:
    """The lesion's whole bright support lies in white matter, it has a few voxels, and (with
    ``occupied``) its support stays about ``gap`` voxels away from the lesions already there."""
    clearance = lesion.support + gap / float(np.min(lesion.radii))
    res = lesion.box(anat.labels.shape, clearance)
    if res is None or res[2]:
        return False
    sl, d, _ = res
    if int((d <= 1.0).sum()) < 3 or not (anat.labels[sl][d < lesion.support] == WM).all():
        return False
    return occupied is None or not occupied[sl][d < clearance].any()


def _mark(occupied: np.ndarray, lesion: _Lesion) -> None:
    sl, d, _ = lesion.box(occupied.shape)
    occupied[sl] |= d < lesion.support


def _propose(anat: Anatomy, rng: np.random.Generator, lid: int, status: str, size: float = 1.0) -> _Lesion:
    amin = 1.5
    amax = amin + (max(3.0, 0.25 * anat.rmean) - amin) * size
    a = float(np.exp(rng.uniform(np.log(amin), np.log(amax))))
    radii = np.array([a, a * rng.uniform(0.5, 0.8), a * rng.uniform(0.5, 0.8)])
    radii[1:] = np.maximum(radii[1:], 0.9)
    contrast = float(rng.uniform(*_LESION_CONTRAST))
    edge = min(_EDGE, 0.06 * anat.rmean)  # narrower on tiny test volumes
    if rng.random() < 0.7:  # periventricular, long axis along the ventricle wall's normal
        vc, vr, vaxes = anat.ventricles[rng.integers(len(anat.ventricles))]
        u = rng.standard_normal(3)
        u /= np.linalg.norm(u)
        wall = vc + vaxes.T @ (vr * u)
        normal = vaxes.T @ (u / vr)
        normal /= np.linalg.norm(normal)
        centre = wall + normal * (a * (1.0 + edge / radii.min()) + rng.uniform(0.5, 2.0))
        return _Lesion(lid, centre, radii, frame(normal, rng), contrast, edge, "periventricular", status)
    centre = anat.centre + anat.radii * rng.uniform(-0.75, 0.75, 3)
    return _Lesion(lid, centre, radii, frame(rng.standard_normal(3), rng), contrast, edge, "deep", status)


def _place(anat, rng, lid, status, occupied, gap=1.0, tries=80) -> _Lesion | None:
    for i in range(tries):
        lesion = _propose(anat, rng, lid, status, size=1.0 if i < tries // 2 else 0.2)  # then smaller
        if _fits(anat, lesion, occupied, gap):
            _mark(occupied, lesion)
            return lesion
    return None


def _baseline(anat: Anatomy, rng: np.random.Generator, n: int) -> list[_Lesion]:
    occupied = np.zeros(anat.labels.shape, dtype=bool)
    lesions: list[_Lesion] = []
    while len(lesions) < n:
        lesion = _place(anat, rng, len(lesions) + 1, "baseline", occupied)
        if lesion is None:
            log.debug("room for only %d of %d lesions in the white matter", len(lesions), n)
            break
        lesions.append(lesion)
        if lesion.kind == "periventricular" and len(lesions) < n and rng.random() < 0.3:
            # A confluent partner: same orientation, overlapping side by side along the wall.
            for _ in range(20):
                scale = rng.uniform(0.6, 1.0)
                step = lesion.axes[1 + rng.integers(2)] * lesion.radii[1] * rng.uniform(1.0, 1.6)
                partner = replace(lesion, id=len(lesions) + 1, kind="confluent", centre=lesion.centre + step,
                                  radii=lesion.radii * scale, contrast=float(rng.uniform(*_LESION_CONTRAST)))
                if _fits(anat, partner):
                    _mark(occupied, partner)
                    lesions.append(partner)
                    break
    return lesions


def _next_timepoint(anat, rng, previous: list[_Lesion], next_id: int) -> list[_Lesion]:
    """Keep every lesion, grow some (radii × 1.2–1.5, outward), add one or two new ones."""
    current = []
    growers = rng.random(len(previous)) < 0.35
    if previous and not growers.any():
        growers[rng.integers(len(previous))] = True
    for lesion, grow in zip(previous, growers, strict=True):
        kept = replace(lesion, status="stable")
        if grow:
            for factor in (rng.uniform(1.2, 1.5), 1.2):
                radii = lesion.radii * factor
                shift = lesion.axes[0] * (radii[0] - lesion.radii[0]) * 1.1
                options = [lesion.centre, lesion.centre + shift, lesion.centre - shift]
                grown = [replace(lesion, radii=radii, centre=c, status="growing") for c in options]
                fitting = [g for g in grown if _fits(anat, g)]
                if fitting:
                    kept = fitting[0]
                    break
        current.append(kept)
    occupied = np.zeros(anat.labels.shape, dtype=bool)
    for lesion in previous + current:
        _mark(occupied, lesion)
    wanted = int(rng.integers(1, 3))
    for _ in range(wanted):
        lesion = _place(anat, rng, next_id, "new", occupied, gap=2.0) or _place(
            anat, rng, next_id, "new", occupied, gap=0.5, tries=200)
        if lesion is None:
            log.debug("no room for %s new lesion(s) in the white matter", wanted)
            break
        current.append(lesion)
        next_id += 1
    return current


# ---------------------------------------------------------------------------- rendering
def _render_lesions(shape, lesions: list[_Lesion]) -> tuple[np.ndarray, np.ndarray]:
    """(relative brightening, rater-1 mask): the mask is where the soft profile is ≥ 0.5."""
    boost = np.zeros(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    for lesion in lesions:
        sl, d, _ = lesion.box(shape)
        profile = smoothstep_profile(d, lesion.support)
        np.maximum(boost[sl], np.float32(lesion.contrast) * profile, out=boost[sl])
        mask[sl] |= d <= 1.0
    return boost, mask


def _second_rater(mask1: np.ndarray, brain: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Rater 2 draws the border of a random half of the lesions one voxel further out or in, on
    one side of each (at most 30 % of the lesion's volume), never merging, splitting or dropping
    a lesion: both raters see the same lesions."""
    labels, n = ndi.label(mask1)
    mask2 = mask1.copy()
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    chosen = (rng.random(n) < 0.5) & (sizes >= 20)  # a voxel's shift is no slight change on tiny ones
    if n and not chosen.any():
        chosen[np.argmax(sizes)] = True
    grow = rng.random(n) < 0.5
    for k, box in enumerate(ndi.find_objects(labels)):
        if not chosen[k]:
            continue
        sl = tuple(slice(max(s.start - 3, 0), s.stop + 3) for s in box)
        lab = labels[sl]
        comp = lab == k + 1
        centroid = np.array(ndi.center_of_mass(comp), dtype=np.float32)[:, None, None, None]
        toward = np.tensordot(rng.standard_normal(3).astype(np.float32),
                              np.indices(comp.shape, dtype=np.float32) - centroid, 1)
        limit = max(1, int(0.3 * sizes[k]))
        removed = _one_side(comp & ~ndi.binary_erosion(comp), toward, limit)
        if not grow[k] and removed.any() and ndi.label(comp & ~removed)[1] == 1:
            mask2[sl][removed] = False
            continue
        ring = ndi.binary_dilation(comp) & ~comp & brain[sl] & ~ndi.maximum_filter((lab != 0) & ~comp, size=5)
        mask2[sl] |= _one_side(ring, toward, limit)
    return mask2


def _one_side(candidates: np.ndarray, toward: np.ndarray, limit: int) -> np.ndarray:
    """The candidates on the positive side of ``toward``, at most ``limit`` of the furthest."""
    picked = candidates & (toward > 0)
    if picked.sum() > limit:
        picked &= toward >= np.sort(toward[picked])[-limit]
    return picked


# ---------------------------------------------------------------------------- the data set
def _subject_truth(out: Path, s: int, timepoints: int, shape, seed: int, raters: int, written: list[Path]):
    rng = np.random.default_rng([seed, s])
    anat = make_anatomy(shape, rng)
    brain = anat.labels != BG
    name = f"training{s:02d}"
    lesions = _baseline(anat, rng, int(rng.integers(4, max(5, 11 - 2 * (timepoints - 1)))))
    next_id = len(lesions) + 1
    scans = []
    for t in range(1, timepoints + 1):
        if t > 1:
            lesions = _next_timepoint(anat, rng, lesions, next_id)
            next_id = max([next_id - 1, *(les.id for les in lesions)]) + 1
        scan_rng = np.random.default_rng([seed, s, t])
        boost, mask1 = _render_lesions(shape, lesions)
        image, acquisition = render_image(anat, boost, scan_rng)
        stem = f"{name}_{t:02d}"
        image_path = out / "training" / name / "preprocessed" / f"{stem}_flair_pp.nii.gz"
        save_nifti(image_path, image, anat.affine, dtype=np.float32)
        masks = [mask1] if raters == 1 else [mask1, _second_rater(mask1, brain, scan_rng)]
        mask_paths = []
        for i, mask in enumerate(masks, start=1):
            path = out / "training" / name / "masks" / f"{stem}_mask{i}.nii.gz"
            save_nifti(path, mask, anat.affine, dtype=np.uint8)
            mask_paths.append(path.relative_to(out).as_posix())
        written.append(image_path)
        scans.append({"timepoint": t, "image": image_path.relative_to(out).as_posix(), "masks": mask_paths,
                      "lesion_voxels": [int(m.sum()) for m in masks], "components": int(ndi.label(mask1)[1]),
                      **acquisition, "lesions": [les.truth() for les in lesions]})
    return {"subject": name, "index": s, "affine": anat.affine.round(6).tolist(), "timepoints": scans}


def make_dataset(out: Path, subjects: int = 4, timepoints: int = 2, shape=(64, 72, 48), seed: int = 0,
                 raters: int = 2) -> list[Path]:
    """Write a synthetic MS-lesion data set in the ISBI 2015 layout under ``out``.

    Returns the written FLAIR image paths (subject by subject, time point by time point). The
    truth about every lesion goes to ``out/synth_truth.json``.
    """
    out = Path(out)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3 or min(shape) < _MIN_SHAPE:
        raise MslpipeError(f"synthetic shape must be 3 sizes of at least {_MIN_SHAPE}, got {shape}")
    if subjects < 1 or timepoints < 1:
        raise MslpipeError(f"need at least one subject and one time point, got {subjects} and {timepoints}")
    if raters not in (1, 2):
        raise MslpipeError(f"raters must be 1 or 2, got {raters}")
    held = [p for p in (out / "training", out / "synth_truth.json") if p.exists()]
    if held:  # never write over a dataset (e.g. `synth raw_data/isbi` by mistake): a new or emptied folder
        raise MslpipeError("synth writes a new dataset, and this folder already holds one (training/ or "
                           "synth_truth.json): give another folder, or empty it", out)
    start = time.perf_counter()
    written: list[Path] = []
    truth = [_subject_truth(out, s, timepoints, shape, seed, raters, written) for s in range(1, subjects + 1)]
    notes = ("centre in voxels (i, j, k); radii are semi-axes along the rows of axes; mask1 = the "
             "voxels at normalised ellipsoid distance <= 1 of any lesion; lesion ids persist over time")
    write_json(out / "synth_truth.json", {"generator": "mslpipe.synth.make_dataset", "seed": seed,
                                          "shape": list(shape), "raters": raters, "notes": notes,
                                          "subjects": truth})
    log.info("wrote %d synthetic scans (%s) to %s in %.2f s", len(written), "x".join(map(str, shape)),
             out, time.perf_counter() - start)
    return written
