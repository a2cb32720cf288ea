"""Preprocessing shared by training and prediction: reorient, brain mask, normalise, crop, slice.

One function, :func:`preprocess_volume`, turns a scan into the network's input; :func:`restore`
maps a prediction back onto the scan's own grid. Training data and new scans go through the
same code, so what the network sees at prediction time is what it saw in training.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mslpipe import postprocess
from mslpipe.brainmask import bounding_box, brain_mask
from mslpipe.datasets import Case
from mslpipe.errors import MslpipeError
from mslpipe.intensity import correct_bias_n4, flatten_field, normalise
from mslpipe.io import load_image, load_mask, make_dir, read_json, save_npy, write_json
from mslpipe.plans import N4_GRID_MM, Plan

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------- orientation
def canonical_ornt(affine: np.ndarray) -> np.ndarray:
    """The axis flips/permutation that bring voxel axes to RAS+ (closest canonical)."""
    import nibabel.orientations as nio

    return nio.io_orientation(affine)


def to_canonical(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    return np.ascontiguousarray(nio.apply_orientation(data, ornt))


def from_canonical(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    import nibabel.orientations as nio

    inverse = nio.ornt_transform(nio.axcodes2ornt(("R", "A", "S")), np.asarray(ornt))
    return np.ascontiguousarray(nio.apply_orientation(data, inverse))


# ---------------------------------------------------------------------------- labels
def combine_raters(masks: list[np.ndarray], policy: str) -> np.ndarray:
    """One training label from one or more raters' masks (float32 in [0, 1])."""
    stack = np.stack([m.astype(np.float32) for m in masks])
    if policy == "mean" or len(masks) == 1:
        return stack.mean(axis=0)
    if policy == "union":
        return stack.max(axis=0)
    if policy == "intersection":
        return stack.min(axis=0)
    if policy == "mask1":
        return stack[0]
    raise MslpipeError(f"unknown label policy {policy!r}")


# ---------------------------------------------------------------------------- one volume
def resample_factors(spacing: np.ndarray, target: list[float] | None, tolerance: float = 0.05) -> np.ndarray | None:
    """Zoom factors from ``spacing`` to ``target`` (canonical axis order), or None when within tolerance."""
    if not target:
        return None
    target_arr = np.asarray(target, dtype=float)
    if np.all(np.abs(spacing - target_arr) <= tolerance * target_arr):
        return None
    return spacing / target_arr


def _zoom_to(data: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    factors = [n / o for n, o in zip(shape, data.shape, strict=True)]
    out = ndimage.zoom(data, factors, order=order, mode="nearest", grid_mode=True)
    return out[tuple(slice(0, n) for n in shape)]


def preprocess_volume(
    channels: list[np.ndarray],
    affine: np.ndarray,
    plan: Plan,
    masks: list[np.ndarray] | None = None,
    where: object = None,
) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
    """Return (image S×C×H×W float32, label S×H×W float32 or None, properties).

    Steps: reorient to RAS, resample to the plan's voxel size when the scan's differs by more than
    5% (scans at the planned size are never interpolated), brain mask, crop, (with the plan's
    ``normalization.flatfield_mm``, :func:`flatten_field`; with its ``n4_levels``, :func:`correct_bias_n4`),
    normalise, slice.
    """
    ornt = canonical_ornt(affine)
    canon = [to_canonical(c, ornt) for c in channels]
    canonical_shape = canon[0].shape
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    factors = resample_factors(spacing, plan.target_spacing)
    canon_masks = [to_canonical(m, ornt) for m in masks] if masks else []
    if factors is not None:
        # to 1e-3 voxels first: a float32 header's 0.89999998 mm and DICOM's 0.9 mm give one grid (155 voxels are
        # 139.5 mm, which rounds to 140, and 139.49999, which rounded to 139)
        shape = tuple(max(1, int(round(round(n * f, 3)))) for n, f in zip(canonical_shape, factors, strict=True))
        canon = [_zoom_to(c, shape, order=1) for c in canon]
        canon_masks = [_zoom_to(m.astype(np.float32), shape, order=1) >= 0.5 for m in canon_masks]
    brain = brain_mask(canon[0])
    if not brain.any():
        raise MslpipeError("image is empty (all zero, one value, or no voxel above its background)", where)
    box = bounding_box(brain, plan.crop_margin)
    sl = tuple(slice(a, b) for a, b in box)
    norm = plan.normalization
    grid = plan.target_spacing if factors is not None else spacing
    stats, normed = [], []
    for c in canon:
        c = c[sl]
        if norm.get("flatfield_mm"):
            c = flatten_field(c, brain[sl], float(norm["flatfield_mm"]), grid)
        elif norm.get("n4_levels"):
            try:
                c = correct_bias_n4(c, brain[sl], grid, levels=int(norm["n4_levels"]),
                                    shrink_mm=float(norm.get("n4_grid_mm", N4_GRID_MM)))
            except RuntimeError as exc:  # ITK's exceptions; the scan, not the code, is the likely cause
                reason = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
                raise MslpipeError(f"N4 bias-field correction failed ({reason}); a plan with --n4 0 skips it",
                                   where) from exc
        arr, st = normalise(c, brain[sl], norm["lower_pct"], norm["upper_pct"], norm["scheme"])
        normed.append(arr)
        stats.append(st)
    axis = plan.slice_axis
    image = np.stack([np.moveaxis(a, axis, 0) for a in normed], axis=1)  # S, C, H, W
    label = None
    if canon_masks:
        combined = combine_raters([m[sl] for m in canon_masks], plan.label_policy)
        label = np.ascontiguousarray(np.moveaxis(combined, axis, 0), dtype=np.float32)
    props = {
        "shape": [int(s) for s in channels[0].shape],
        "affine": np.asarray(affine).tolist(),
        "ornt": ornt.tolist(),
        "canonical_shape": [int(s) for s in canonical_shape],
        "resampled_shape": [int(s) for s in canon[0].shape] if factors is not None else None,
        "crop_box": box,
        "slice_axis": axis,
        "spacing_canonical": [float(s) for s in spacing],
        "norm": stats,
        "brain_voxels": int(brain.sum()),
    }
    if label is not None:
        props["fg_slices"] = [int(i) for i in np.flatnonzero(label.reshape(label.shape[0], -1).max(1) > 0)]
    return np.ascontiguousarray(image, dtype=np.float32), label, props


BRAIN_ML_TOLERANCE = (0.6, 1.5)  # a scan's brain-mask volume below 0.6× the smallest or above 1.5× the largest


def brain_volume_ml(props: dict[str, Any], plan: Plan) -> float:
    """The brain mask's volume in mL, on the grid it was computed on (the planned voxel size if resampled)."""
    spacing = plan.target_spacing if props.get("resampled_shape") else props["spacing_canonical"]
    return float(props["brain_voxels"] * np.prod(spacing) / 1000)


def brain_volume_warning(props: dict[str, Any], plan: Plan) -> str | None:
    """A sentence when a scan's brain mask is far larger or smaller than the planned scans' (``brain_ml_range``):
    a whole head that was not skull-stripped, or a scan that covers only part of the brain."""
    if not plan.brain_ml_range:
        return None
    lo, hi = plan.brain_ml_range
    ml = brain_volume_ml(props, plan)
    if BRAIN_ML_TOLERANCE[0] * lo <= ml <= BRAIN_ML_TOLERANCE[1] * hi:
        return None
    why = "not skull-stripped?" if ml > hi else "only part of the brain in view?"
    return (f"brain mask {ml:.0f} mL, the training scans' {lo:.0f}-{hi:.0f} mL ({why}); segmented anyway, "
            "check the result")


def restore(pred: np.ndarray, props: dict[str, Any], fill: float = 0) -> np.ndarray:
    """Map an S×H×W prediction on the preprocessed grid back to the scan's own grid.

    Probabilities are interpolated linearly when the scan was resampled; integer masks by nearest
    neighbour.
    """
    grid = props.get("resampled_shape") or props["canonical_shape"]
    canonical = np.full(grid, fill, dtype=pred.dtype)
    box = props["crop_box"]
    canonical[tuple(slice(a, b) for a, b in box)] = np.moveaxis(pred, 0, props["slice_axis"])
    if props.get("resampled_shape"):
        order = 1 if np.issubdtype(pred.dtype, np.floating) else 0
        canonical = _zoom_to(canonical, tuple(props["canonical_shape"]), order=order)
    return from_canonical(canonical, np.asarray(props["ornt"]))


def with_context(volume, index: np.ndarray, context: int):
    """Slices ``index`` of an S×C×H×W volume, each with ``context`` neighbours on either side stacked as
    channels (N×C·(2·context+1)×H×W, neighbours in slice order; the edge slice repeats past the ends).

    ``volume`` is a NumPy array (or memory map; an array comes back) or a torch tensor (a tensor on
    the same device comes back, so a predictor can build its batches on the GPU).
    """
    index = np.asarray(index, dtype=np.int64)
    offsets = np.arange(-context, context + 1)
    rows = np.clip(index[:, None] + offsets[None, :], 0, volume.shape[0] - 1).ravel()
    if isinstance(volume, np.ndarray):
        stacked = np.asarray(volume[rows])
    else:  # a torch tensor
        import torch

        stacked = volume[torch.as_tensor(rows, device=volume.device)]
    return stacked.reshape(len(index), -1, *volume.shape[2:])


def pad_to_multiple(image: np.ndarray, divisor: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Zero-pad an S×C×H×W stack at the end of H and W to multiples of ``divisor``; return it and (H, W)."""
    h, w = image.shape[-2:]
    ph, pw = (-h) % divisor, (-w) % divisor
    if ph or pw:
        image = np.pad(image, ((0, 0), (0, 0), (0, ph), (0, pw)))
    return image, (h, w)


@dataclass
class PreparedScan:
    """A scan made ready for the network by :func:`prepare_scan`: the S×C×H×W input, what
    :func:`restore` needs to map a prediction back, and a quality warning (or None)."""

    image: np.ndarray
    props: dict[str, Any]
    warning: str | None


def prepare_scan(channels: list[np.ndarray], affine: np.ndarray, plan: Plan, where: object = None) -> PreparedScan:
    """:func:`preprocess_volume` for prediction, plus the brain-size check (:func:`brain_volume_warning`, logged)."""
    image, _, props = preprocess_volume(channels, affine, plan, where=where)
    unusual = brain_volume_warning(props, plan)
    if unusual:
        log.warning("%s: %s", where if where is not None else "scan", unusual)
    return PreparedScan(image, props, unusual)


def finish_scan(prob: np.ndarray, prepared: PreparedScan, affine: np.ndarray,
                postprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """Map the network's S×H×W probabilities back onto the scan's grid and postprocess them:
    (uint8 mask, float32 probabilities)."""
    prob = restore(prob, prepared.props)
    return postprocess.apply(prob, affine, postprocessing), prob


def segment(run_volume: Callable[[np.ndarray], np.ndarray], channels: list[np.ndarray], affine: np.ndarray,
            plan: Plan, postprocessing: dict, where: object = None,
            notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One scan to (uint8 mask, float32 probabilities) on its own grid: :func:`prepare_scan`, ``run_volume``
    (S×C×H×W → S×H×W probabilities), :func:`finish_scan`, one after the other (``mslpipe predict`` runs them for
    successive scans side by side). Shared by the torch and the ONNX Runtime predictors. A quality warning is
    appended to ``notes`` when that is a list."""
    prepared = prepare_scan(channels, affine, plan, where=where)
    if prepared.warning and notes is not None:
        notes.append(prepared.warning)
    return finish_scan(run_volume(prepared.image), prepared, affine, postprocessing)


# ---------------------------------------------------------------------------- a dataset
def load_case(case: Case) -> tuple[list[np.ndarray], np.ndarray, list[np.ndarray]]:
    """Read and check a case's channels and masks (shapes and affines must agree)."""
    channels, affine = [], None
    for path in case.images.values():
        data, aff = load_image(path)
        if affine is None:
            affine, shape = aff, data.shape
        elif data.shape != shape or not np.allclose(aff, affine, atol=1e-3):
            raise MslpipeError("channel is not on the same grid as the case's first channel", path)
        channels.append(data)
    masks = [load_mask(m, like_shape=shape, like_affine=affine) for m in case.masks]
    return channels, affine, masks


def source_digest(case: Case) -> str:
    """SHA-256 over the contents of a case's images and masks (in channel and rater order)."""
    import hashlib

    digest = hashlib.sha256()
    for role, path in [*sorted(case.images.items()), *((f"mask{i + 1}", m) for i, m in enumerate(case.masks))]:
        digest.update(role.encode())
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        except OSError as exc:
            raise MslpipeError(f"cannot read ({exc.strerror or exc})", path) from exc
    return digest.hexdigest()


def preprocess_workers(n_cases: int) -> int:
    """Cases preprocessed at once by :func:`run`: one per CPU core, at most 8 and at most the cases. Threads
    suffice: reading (zlib), N4 (SimpleITK) and the array work release the GIL for most of their time; each
    case in flight holds a few copies of its volume (a few hundred MB for an MNI-size scan)."""
    return max(1, min(n_cases, os.cpu_count() or 1, 8))


def _is_done(case: Case, out_dir: Path, key: str, digest: str) -> bool:
    props_path = out_dir / f"{case.id}.json"
    if not (props_path.exists() and (out_dir / f"{case.id}.npy").exists()):
        return False
    try:
        done = read_json(props_path)
    except MslpipeError:
        return False
    return done.get("preprocessing_hash") == key and done.get("source_digest") == digest


def _preprocess_case(case: Case, plan: Plan, out_dir: Path, key: str, digest: str) -> None:
    channels, affine, masks = load_case(case)
    image, label, props = preprocess_volume(channels, affine, plan, masks, where=case.images["flair"]
                                            if "flair" in case.images else None)
    props.update(case=case.id, subject=case.subject, timepoint=case.timepoint,
                 preprocessing_hash=key, source_digest=digest, test_only=case.test_only)
    save_npy(out_dir / f"{case.id}.npy", image)
    if label is not None:
        save_npy(out_dir / f"{case.id}_seg.npy", label)
    write_json(out_dir / f"{case.id}.json", props)  # written last: its presence marks the case complete


def run(cases: list[Case], plan: Plan, out_dir: Path, progress=None, workers: int | None = None) -> list[str]:
    """Preprocess every case into ``out_dir``; skip cases already done with the same plan from the
    same source files (a content digest, so an edited or replaced scan or mask is preprocessed again).

    ``workers`` cases at once (default :func:`preprocess_workers`), each case's files written whole and its
    properties file last, so a failure leaves every other case either complete or absent. On a failure the
    cases not yet started are not started, and the first error (in case order) is raised.

    Returns the ids that were (re)written, in the order of ``cases``.
    """
    make_dir(out_dir)
    key = plan.preprocessing_hash()
    todo = []
    for case in cases:
        digest = source_digest(case)
        if _is_done(case, out_dir, key, digest):
            if progress:
                progress(case.id)
        else:
            todo.append((case, digest))
    if not todo:
        return []
    with ThreadPoolExecutor(max_workers=workers or preprocess_workers(len(todo))) as pool:
        futures = {pool.submit(_preprocess_case, case, plan, out_dir, key, digest): case for case, digest in todo}
        for fut in as_completed(futures):
            if fut.cancelled():
                continue
            if fut.exception() is not None:
                for other in futures:  # those not started yet; the running ones finish
                    other.cancel()
            elif progress:
                progress(futures[fut].id)
    for fut in futures:  # the first failure in case order, so the message does not depend on timing
        if not fut.cancelled() and fut.exception() is not None:
            raise fut.exception()
    return [case.id for case, _ in todo]
