"""QC pictures of a segmented scan: PNG overlays of the mask (and a reference) on the FLAIR, for ``predict --report``.

``qc/<case>_slices.png`` shows the axial slices with the most lesion, ``qc/<case>_planes.png`` three planes through
the largest lesion. Slices are reoriented to RAS and drawn in the neurological convention, each panel marked with
the patient's sides (``report.ORIENTATION_NOTE`` says it in words on the page).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mslpipe.io import atomic_path

QC_DIR = "qc"
TOP_SLICES, MIN_GAP = 3, 3  # axial panels per case, at least 3 slices apart
PANEL_INCHES, DPI = 2.6, 100  # at most 260 px per panel
ALPHA = 0.6
COLOURS = {"lesion": "#ff9900", "tp": "#22dd22", "fp": "#ff2222", "fn": "#3377ff"}
# the patient's side at the left and right edge of a panel, by the canonical axis it slices
SIDES = {2: ("L", "R"), 1: ("L", "R"), 0: ("P", "A")}


def _canonical(affine: np.ndarray, arrays: list[np.ndarray]):
    """Arrays reoriented to RAS, their RAS affine, and the orientation used."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(affine)
    shape = arrays[0].shape
    canon = [np.asarray(nio.apply_orientation(a, ornt)) for a in arrays]
    return canon, affine @ nio.inv_ornt_aff(ornt, shape), ornt


def _input_index(ornt: np.ndarray, shape: tuple[int, ...], canon_axis: int, k: int) -> int:
    """The input scan's voxel index of canonical slice ``k`` along ``canon_axis``."""
    axis = int(np.flatnonzero(ornt[:, 0] == canon_axis)[0])
    return int(shape[axis] - 1 - k) if ornt[axis, 1] < 0 else int(k)


def _brain_threshold(image: np.ndarray) -> float:
    """Brain (head) voxels are above 5% of the bright end."""
    bright = float(np.percentile(image, 99.5))
    return 0.05 * bright if bright > 0 else -np.inf


def _window(image: np.ndarray) -> tuple[float, float]:
    """Grey-level window: the 0.5th to 99.5th percentile of the brain's intensities."""
    brain = image[image > _brain_threshold(image)]
    lo, hi = (float(v) for v in np.percentile(brain if brain.size else image, [0.5, 99.5]))
    return lo, hi if hi > lo else lo + 1.0


def _crop_box(image: np.ndarray, lesions: np.ndarray, margin: int = 4) -> tuple[slice, ...]:
    """The box around the brain (and every lesion voxel), so that the panels show little background."""
    where = np.argwhere((image > _brain_threshold(image)) | lesions)
    if where.size == 0:
        return tuple(slice(0, n) for n in image.shape)
    lo, hi = np.maximum(where.min(axis=0) - margin, 0), np.minimum(where.max(axis=0) + margin + 1, image.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi, strict=True))


def _overlay(pred: np.ndarray, ref: np.ndarray | None) -> np.ndarray:
    from matplotlib.colors import to_rgba

    rgba = np.zeros(pred.shape + (4,), dtype=np.float32)
    if ref is None:
        parts = {"lesion": pred}
    else:
        parts = {"tp": pred & ref, "fp": pred & ~ref, "fn": ~pred & ref}
    for key, where in parts.items():
        rgba[where] = to_rgba(COLOURS[key], ALPHA)
    return rgba


def _render(path: Path, panels: list[dict], window: tuple[float, float]) -> None:
    """One PNG, a row of panels; each panel: image, pred, ref (or None), aspect, title, optional marker."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(PANEL_INCHES * len(panels), PANEL_INCHES + 0.25), dpi=DPI, facecolor="black")
    FigureCanvasAgg(fig)
    for i, p in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        # sharp voxels when enlarged; when shrunk, smoothing keeps one-voxel lesions from vanishing
        smooth = "antialiased" if max(p["image"].shape) > PANEL_INCHES * DPI else "nearest"
        ax.imshow(p["image"].T, cmap="gray", vmin=window[0], vmax=window[1], origin="lower",
                  aspect=p["aspect"], interpolation=smooth)
        ax.imshow(_overlay(p["pred"], p["ref"]).transpose(1, 0, 2), origin="lower", aspect=p["aspect"],
                  interpolation=smooth)
        if p.get("marker") is not None:
            ax.plot(*p["marker"], marker="+", color="yellow", markersize=9, markeredgewidth=1)
        for x, side, align in zip((0.01, 0.99), p.get("sides", ()), ("left", "right"), strict=False):
            ax.text(x, 0.5, side, transform=ax.transAxes, ha=align, va="center", fontsize=8, color="#cccccc")
        ax.set_title(p["title"], fontsize=8, color="white")
        ax.set_axis_off()
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.9, wspace=0.04)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, facecolor="black")


def render_case_images(out_dir: Path, case: str, image: np.ndarray, mask: np.ndarray, affine: np.ndarray,
                       summary: dict, ref: np.ndarray | None = None) -> list[dict]:
    """Write ``qc/<case>_slices.png`` (and ``qc/<case>_planes.png`` when there are lesions)."""
    arrays = [np.nan_to_num(np.asarray(image, dtype=np.float32)), np.asarray(mask) != 0]
    if ref is not None:
        arrays.append(np.asarray(ref) != 0)
    canon, canon_affine, ornt = _canonical(np.asarray(affine, dtype=np.float64), arrays)
    box = _crop_box(canon[0], np.logical_or.reduce(canon[1:]))
    offset = np.array([b.start for b in box])
    img, pred, *rest = (a[box] for a in canon)
    truth = rest[0] if rest else None
    shape = np.shape(mask)
    zooms = np.linalg.norm(canon_affine[:3, :3], axis=0)
    window = _window(arrays[0])

    def index(axis: int, k: int) -> int:  # the input scan's index of cropped canonical slice k
        return _input_index(ornt, shape, axis, int(k) + int(offset[axis]))
    aspects = {2: zooms[1] / zooms[0], 1: zooms[2] / zooms[0], 0: zooms[2] / zooms[1]}

    def panel(axis: int, k: int, title: str, marker=None) -> dict:
        return {"image": np.take(img, k, axis), "pred": np.take(pred, k, axis),
                "ref": None if truth is None else np.take(truth, k, axis), "aspect": aspects[axis],
                "title": title, "marker": marker, "sides": SIDES[axis]}

    qc = Path(out_dir) / QC_DIR
    images = []
    per_slice = (pred if truth is None else pred | truth).sum(axis=(0, 1))
    top: list[int] = []  # the slices with the most lesion, at least MIN_GAP apart so that they differ
    for k in np.argsort(-per_slice, kind="stable"):
        if per_slice[k] == 0 or len(top) == TOP_SLICES:
            break
        if all(abs(int(k) - t) >= MIN_GAP for t in top):
            top.append(int(k))
    if top:
        panels = [panel(2, k, f"axial {index(2, k)}: {int(per_slice[k])} vox") for k in top]
        which = "prediction and reference" if truth is not None else "prediction"
        caption = f"axial slices with the most lesion ({which})"
    else:
        mid = img.shape[2] // 2
        panels = [panel(2, mid, f"axial {index(2, mid)}: no lesions found")]
        caption = "middle axial slice: no lesions found"
    _render(qc / f"{case}_slices.png", panels, window)
    images.append({"file": f"{QC_DIR}/{case}_slices.png", "caption": caption})
    if summary["lesions"]:
        largest = max(summary["lesions"], key=lambda les: les["volume_mm3"])
        world = np.append(np.asarray(largest["centroid_mm"], dtype=np.float64), 1.0)
        c = np.linalg.solve(canon_affine, world)[:3] - offset
        ijk = [int(np.clip(np.rint(v), 0, n - 1)) for v, n in zip(c, img.shape, strict=True)]
        names = {2: "axial", 1: "coronal", 0: "sagittal"}
        marks = {2: (c[0], c[1]), 1: (c[0], c[2]), 0: (c[1], c[2])}
        panels = [panel(a, ijk[a], f"{names[a]} {index(a, ijk[a])}", marks[a])
                  for a in (2, 1, 0)]
        _render(qc / f"{case}_planes.png", panels, window)
        images.append({"file": f"{QC_DIR}/{case}_planes.png",
                       "caption": f"three planes through the centroid (+) of the largest lesion, id {largest['id']} "
                                  f"({largest['volume_mm3']:.1f} mm³)"})
    else:
        (qc / f"{case}_planes.png").unlink(missing_ok=True)  # from an earlier run with lesions
    return images
