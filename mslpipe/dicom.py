"""DICOM series: find them in a folder, read their naming fields, load one as a volume, write one (SimpleITK).

SimpleITK is imported inside each function, so importing this module stays cheap. Volumes come back as
nibabel would load them (float32 in i,j,k order with a RAS affine); see :func:`mslpipe.io.sitk_to_numpy`.
Every file written goes through :func:`mslpipe.io.atomic_path`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mslpipe.errors import MslpipeError
from mslpipe.io import NIFTI_SUFFIXES, atomic_path, numpy_to_sitk, sitk_to_numpy

log = logging.getLogger(__name__)

# GDCM, which SimpleITK reads and writes DICOM with, is not safe to call from several threads at once (SimpleITK
# issues 805 and 1466: crashes), and predict reads scans in several threads beside a GPU. One call at a time, then; the
# lock is re-entrant because loading a series first finds it.
_GDCM_LOCK = threading.RLock()


@contextlib.contextmanager
def _gdcm_guard() -> Iterator[None]:
    """One GDCM call at a time in this process; and ITK resets the process locale to "C" (text I/O then defaults
    to ASCII), so put it back afterwards (under the same lock: the locale is the whole process's)."""
    import locale

    with _GDCM_LOCK:
        saved = locale.setlocale(locale.LC_ALL)
        try:
            yield
        finally:
            locale.setlocale(locale.LC_ALL, saved)


# names of files a DICOM export puts beside its series that are no images
NOT_IMAGES = ("dicomdir", "lockfile", "version", "readme", "readme.txt", "index.htm", "index.html")


@_gdcm_guard()
def find_dicom_series(folder: str | os.PathLike) -> list[tuple[str, list[str]]]:
    """List DICOM series under ``folder`` as (series uid, sorted file names); SimpleITK does the sort.

    A series whose files lie in several folders (exports that cap a folder's files) is one series, its files sorted
    along the slice normal. Files in a series' folder that belong to no series (damaged, or not DICOM) are named in
    a warning: a damaged first or last slice would otherwise leave the volume a slice short unsaid.

    ITK's warnings are off meanwhile: it prints one ("No Series were found") on stderr for every folder without a
    series, which is most of them in a DICOM tree and all of them in a NIfTI folder."""
    import SimpleITK as sitk

    folders = [Path(folder)] + sorted(p for p in Path(folder).rglob("*") if p.is_dir())
    found: dict[str, list[list[str]]] = {}
    warnings = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        for sub in folders:
            reader = sitk.ImageSeriesReader()
            here: set[str] = set()
            for uid in reader.GetGDCMSeriesIDs(str(sub)) or ():
                files = list(reader.GetGDCMSeriesFileNames(str(sub), uid))
                if files:
                    found.setdefault(uid, []).append(files)
                    here.update(os.path.basename(f) for f in files)
            if here:
                _warn_stray_files(sub, here)
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(warnings)
    return [(uid, parts[0] if len(parts) == 1 else _sorted_along_normal([f for p in parts for f in p]))
            for uid, parts in found.items()]


def _warn_stray_files(folder: Path, in_series: set[str]) -> None:
    stray = sorted(p.name for p in folder.iterdir() if p.is_file() and p.name not in in_series
                   and not p.name.startswith(".") and p.name.lower() not in NOT_IMAGES
                   and not p.name.lower().endswith(NIFTI_SUFFIXES))
    if stray:
        log.warning("%s: %d file(s) beside its DICOM series belong to no series (damaged, or not DICOM) and are left "
                    "out: %s%s", folder, len(stray), ", ".join(stray[:5]), ", ..." if len(stray) > 5 else "")


def _slice_geometry(name: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(position, normal, in-plane size) of one slice file, from its header."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(name)
    r.LoadPrivateTagsOff()
    try:
        r.ReadImageInformation()
    except RuntimeError as exc:
        raise MslpipeError(f"cannot read the DICOM header ({str(exc).strip().splitlines()[-1]})", name) from exc
    if r.GetNumberOfComponents() != 1:
        raise MslpipeError(f"a colour image ({r.GetNumberOfComponents()} values per pixel), not an MRI scan (a screen "
                           "capture?)", name)
    normal = np.asarray(r.GetDirection(), dtype=float).reshape(3, 3)[:, 2]
    return np.asarray(r.GetOrigin(), dtype=float), normal, tuple(r.GetSize()[:2])


def _sorted_along_normal(files: list[str]) -> list[str]:
    try:
        geometry = [_slice_geometry(f) for f in files]
    except MslpipeError:  # left in their folders' order: reading the series refuses it, for that scan alone
        return files
    normal = geometry[0][1]
    return [f for _, f in sorted(zip((float(g[0] @ normal) for g in geometry), files, strict=True))]


def _check_dicom_spacing(files: list[str], folder: Path) -> None:
    """Refuse a series that is not one evenly spaced stack of like slices: a missing slice (uneven spacing),
    slices at one position (several echoes or time points), slices of different sizes, or slices that step
    sideways as well as along their normal (a tilted gantry's sheared stack, which a grid cannot hold)."""
    geometry = [_slice_geometry(name) for name in files]
    if len(geometry) < 2:
        frames = _frames(files[0]) if files else 0
        if frames > 1:
            raise MslpipeError(f"a multi-frame DICOM file ({frames} frames in one file) is not read here: convert "
                               "it to NIfTI first (e.g. dcm2niix) and give the .nii.gz", folder)
        raise MslpipeError("DICOM series has fewer than 2 slices", folder)
    sizes = sorted({g[2] for g in geometry})
    if len(sizes) > 1:
        raise MslpipeError(f"DICOM series mixes slices of different sizes ({' and '.join(f'{a}x{b}' for a, b in sizes)}"
                           "): several series under one series UID?", folder)
    positions = np.stack([g[0] for g in geometry])
    held = len(np.unique(np.round(positions, 2), axis=0))
    if held < len(positions):
        raise MslpipeError(f"DICOM series has {len(positions)} images at {held} slice positions (several echoes or "
                           "time points in one series?): give one volume per series", folder)
    steps = np.diff(positions, axis=0)
    gaps = np.linalg.norm(steps, axis=1)
    step = np.median(gaps)
    if np.any(np.abs(gaps - step) > 0.1 * step + 1e-3):
        worst = int(np.argmax(np.abs(gaps - step)))
        raise MslpipeError(
            f"DICOM series has uneven slice spacing (a missing slice? gap {gaps[worst]:.2f} mm "
            f"after slice {worst + 1}, expected {step:.2f} mm)",
            folder,
        )
    normal = geometry[0][1]
    along = np.abs(steps @ normal) / gaps
    if np.any(along < math.cos(math.radians(1.0))):
        tilt = math.degrees(math.acos(float(np.clip(along.min(), -1.0, 1.0))))
        raise MslpipeError(f"DICOM series' slices step {tilt:.1f} degrees off their normal (a tilted gantry?): a "
                           "sheared stack; resample it onto a regular grid first", folder)


def _frames(name: str) -> int:
    """NumberOfFrames of a DICOM file (1 where the header has none)."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(name)
    r.LoadPrivateTagsOff()
    try:
        r.ReadImageInformation()
        return int(r.GetMetaData("0028|0008").strip()) if r.HasMetaDataKey("0028|0008") else 1
    except (RuntimeError, ValueError):
        return 1


# header fields that name a series, as (DICOM tag, key): what a FLAIR series is recognised by
SERIES_TAGS = (("0008|103e", "description"), ("0018|1030", "protocol"), ("0020|0011", "number"))


@_gdcm_guard()
def dicom_series_info(files: list[str]) -> dict[str, str]:
    """The naming fields (:data:`SERIES_TAGS`) of a series, from its first file's header ('' where absent)."""
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    reader.LoadPrivateTagsOff()
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return {key: "" for _, key in SERIES_TAGS}
    return {key: reader.GetMetaData(tag).strip() if reader.HasMetaDataKey(tag) else "" for tag, key in SERIES_TAGS}


@_gdcm_guard()
def load_dicom_series(folder: str | os.PathLike, files: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read the single DICOM series in ``folder`` (or the series of ``files``, sorted, one series found by
    :func:`find_dicom_series`; ``folder`` then names it in errors) as (float32 array, nibabel-style RAS affine).

    Refuses a folder with no series, with several series mixed together, or with a gap.
    """
    import SimpleITK as sitk

    folder = Path(folder)
    if files is None:
        if not folder.is_dir():
            raise MslpipeError("not a folder", folder)
        series = find_dicom_series(folder)
        if not series:
            raise MslpipeError("no DICOM series found", folder)
        if len(series) > 1:
            raise MslpipeError(f"{len(series)} DICOM series mixed in one folder; give one series per folder",
                               folder)
        files = series[0][1]
    _check_dicom_spacing(files, folder)
    try:
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(files)
        # float32 whatever the first slice's type: with a rescale slope per slice, an integral first slope made
        # ITK read every slice as integers, cutting the others' rescaled values
        reader.SetOutputPixelType(sitk.sitkFloat32)
        image = reader.Execute()
    except RuntimeError as exc:
        raise MslpipeError(f"cannot read DICOM series ({str(exc).strip().splitlines()[-1]})", folder) from exc
    return sitk_to_numpy(image, folder)


def _uid(key: str) -> str:
    """A DICOM UID from ``key``, the same every run: our root, then 12 digits of the key's SHA-1."""
    return "1.2.826.0.1.3680043.2.1125." + str(int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10**12)


@_gdcm_guard()
def write_dicom_series(folder: str | os.PathLike, data: np.ndarray, affine: np.ndarray, description: str = "",
                       number: int = 1, prefix: str = "slice") -> Path:
    """Write a volume as a DICOM series (one file per slice, ``PREFIX_KKKK.dcm``; ``description`` and ``number``
    in its SeriesDescription and SeriesNumber): used by tests and for demos.

    Every UID is set here, derived from the folder's path, so writing again gives the same UIDs (only the study
    date and time are the writing's): series written into one parent folder share a study, a series' slices share
    a frame of reference, each slice has its own instance UID. GDCM, left to itself, gave every slice a random study
    of its own."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = lps @ affine[:3, :3] / spacing
    values = np.rint(np.asarray(data, dtype=np.float64))  # round to the nearest integer, not truncate
    if values.size and not (np.isfinite(values).all() and values.min() >= -32768 and values.max() <= 32767):
        raise MslpipeError("NaN, Inf or values outside the int16 range cannot be written as DICOM", folder)
    image = numpy_to_sitk(values, affine, dtype=np.int16)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    series = f"{folder}|{description}|{number}"
    study, series_uid, frame = _uid(f"{folder.parent}|study"), _uid(series), _uid(f"{series}|frame")
    for k in range(image.GetDepth()):
        sl = image[:, :, k]
        origin = image.TransformIndexToPhysicalPoint((0, 0, k))
        sl.SetMetaData("0020|000d", study)  # study instance uid
        sl.SetMetaData("0020|000e", series_uid)  # series instance uid
        sl.SetMetaData("0008|0018", _uid(f"{series}|{prefix}|{k}"))  # sop instance uid
        sl.SetMetaData("0020|0052", frame)  # frame of reference uid
        sl.SetMetaData("0008|0060", "MR")
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in origin))
        sl.SetMetaData("0020|0037", "\\".join(f"{v:.6f}" for v in direction[:, :2].T.ravel()))
        sl.SetMetaData("0020|0013", str(k + 1))
        sl.SetMetaData("0020|0011", str(number))
        if description:
            sl.SetMetaData("0008|103e", description)
        sl.SetMetaData("0028|0030", f"{spacing[1]:.6f}\\{spacing[0]:.6f}")
        sl.SetMetaData("0018|0050", f"{spacing[2]:.6f}")
        with atomic_path(folder / f"{prefix}_{k:04d}.dcm") as tmp:
            writer.SetFileName(str(tmp))
            writer.Execute(sl)
    return folder
