"""Reading and writing: NIfTI volumes, JSON, the one atomic-write helper, and numpy <-> SimpleITK images.

DICOM series are read and written by :mod:`mslpipe.dicom`, which builds on this module.

Every file mslpipe writes goes through :func:`atomic_path`: the content is written to a
temporary file in the destination folder and renamed into place, so a crash or a kill
never leaves a half-written file behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from mslpipe.errors import MslpipeError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
PROBABILITY_DIR = "probabilities"  # predict --save-probabilities: OUT/probabilities/<case>.nii.gz


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# mkstemp creates files readable by their owner only; finished outputs get the usual permissions.
FILE_MODE = 0o666 & ~_current_umask()


# ---------------------------------------------------------------------------- atomic writes
def make_dir(path: str | os.PathLike) -> Path:
    """``mkdir -p``; a folder that cannot be made (read-only place, a file in the way) is one MslpipeError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MslpipeError(f"cannot create this folder ({exc.strerror or exc})", path) from exc
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` if the block succeeds.

    ``suffix`` is the temporary file's ending (some writers, like nibabel, pick the format
    from it); by default it is the destination's own ending.
    """
    path = Path(path)
    if suffix is None:
        suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".nii.gz") else path.suffix
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{suffix}", dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise MslpipeError(f"cannot write here ({exc.strerror or exc})", path.parent) from exc
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except OSError as exc:
        raise MslpipeError(f"cannot write ({exc.strerror or exc})", path) from exc
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")


def to_json(obj) -> str:
    return json.dumps(obj, indent=2, default=_json_default, allow_nan=False) + "\n"


def write_json(path: str | os.PathLike, obj) -> Path:
    try:
        text = to_json(obj)
    except ValueError as exc:  # NaN/Inf (JSON has none) or a circular reference: write nothing
        raise MslpipeError(f"cannot write JSON ({exc})", path) from exc
    return atomic_write_text(path, text)


def read_json(path: str | os.PathLike):
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise MslpipeError("file not found", path) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MslpipeError(f"cannot read ({exc})", path) from exc
    except json.JSONDecodeError as exc:
        raise MslpipeError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path) from exc


def save_npy(path: str | os.PathLike, array: np.ndarray) -> Path:
    with atomic_path(path, suffix=".npy") as tmp:
        np.save(tmp, array)
    return Path(path)


# ---------------------------------------------------------------------------- NIfTI
def strip_nifti_suffix(name: str) -> str:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_nifti(path: str | os.PathLike) -> bool:
    return str(path).endswith(NIFTI_SUFFIXES)


def _load_nifti_image(path: Path):
    import nibabel as nib

    if not path.exists():
        raise MslpipeError("file not found", path)
    if not path.is_file():
        raise MslpipeError("not a regular file", path)
    if not os.access(path, os.R_OK):
        raise MslpipeError("file is not readable (permission denied)", path)
    try:
        img = nib.load(str(path))
        if not isinstance(img, nib.Nifti1Image | nib.Nifti2Image):
            raise MslpipeError(f"not a NIfTI image ({type(img).__name__})", path)
        data = np.asanyarray(img.dataobj)
    except MslpipeError:
        raise
    except MemoryError as exc:
        raise MslpipeError("image too large to load", path) from exc
    except Exception as exc:  # nibabel, gzip, zlib and numpy raise many types on corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MslpipeError(f"cannot read as NIfTI ({reason})", path) from exc
    return img, data


def _check_3d(data: np.ndarray, path: Path) -> np.ndarray:
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise MslpipeError(f"expected a 3D volume, got {data.ndim}D with shape {tuple(data.shape)}", path)
    if min(data.shape) < 1:
        raise MslpipeError(f"empty volume with shape {tuple(data.shape)}", path)
    return data


def load_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D image as float32, with its 4×4 affine. Rejects non-3D and non-finite data."""
    path = Path(path)
    img, data = _load_nifti_image(path)
    data = _check_3d(data, path)
    if not np.issubdtype(data.dtype, np.number) or np.issubdtype(data.dtype, np.complexfloating):
        raise MslpipeError(f"unsupported voxel type {data.dtype}", path)
    data = np.asarray(data, dtype=np.float32)
    if not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise MslpipeError(f"{n_bad} voxels are NaN or Inf", path)
    affine = np.asarray(img.affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise MslpipeError("invalid affine (singular or not finite)", path)
    return data, affine


def load_mask(
    path: str | os.PathLike,
    like_shape: tuple[int, ...] | None = None,
    like_affine: np.ndarray | None = None,
    atol: float = 1e-3,
) -> np.ndarray:
    """Load a binary mask (0/1 in any dtype) as uint8; optionally check it matches an image grid."""
    path = Path(path)
    data, affine = load_image(path)
    values = np.unique(data)
    if not np.isin(values, (0.0, 1.0)).all():
        extra = [float(v) for v in values if v not in (0.0, 1.0)][:3]
        raise MslpipeError(f"mask is not binary: values {extra} outside {{0, 1}}", path)
    if like_shape is not None and tuple(data.shape) != tuple(like_shape):
        raise MslpipeError(
            f"mask shape {tuple(data.shape)} differs from its image's {tuple(like_shape)}", path
        )
    if like_affine is not None and not np.allclose(affine, like_affine, atol=atol):
        raise MslpipeError("mask affine differs from its image's (not on the same grid)", path)
    return data.astype(np.uint8)


def saved_probability(mask_path: str | os.PathLike, like_shape: tuple[int, ...]) -> np.ndarray | None:
    """The lesion probability map that ``predict --save-probabilities`` wrote beside the mask ``OUT/<case>.nii.gz``
    (``OUT/probabilities/<case>.nii.gz``), or None when there is none; one that does not fit is refused."""
    saved = Path(mask_path).parent / PROBABILITY_DIR / Path(mask_path).name
    if not saved.is_file():
        return None
    probability = load_image(saved)[0]
    if probability.shape != tuple(like_shape):
        raise MslpipeError(f"probabilities of shape {probability.shape} for a mask of shape {tuple(like_shape)}", saved)
    if not (np.isfinite(probability).all() and probability.min() >= 0.0 and probability.max() <= 1.0):
        raise MslpipeError("not a probability map (values outside [0, 1])", saved)
    return probability


def save_nifti(
    path: str | os.PathLike, array: np.ndarray, affine: np.ndarray, dtype=np.uint8
) -> Path:
    """Write ``array`` as NIfTI (``.nii`` or ``.nii.gz``, from the name) atomically."""
    import nibabel as nib

    path = Path(path)
    img = nib.Nifti1Image(np.asarray(array, dtype=dtype), np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def axial_axis(affine: np.ndarray) -> int:
    """The array axis closest to world S-I (the axis axial slices are taken along)."""
    import nibabel.orientations as nio

    ornt = nio.io_orientation(np.asarray(affine, dtype=np.float64))
    hit = np.flatnonzero(ornt[:, 0] == 2)
    if hit.size:
        return int(hit[0])
    cols = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(cols[2]) / np.linalg.norm(cols, axis=0)))


# ---------------------------------------------------------------------------- SimpleITK images
def numpy_to_sitk(data: np.ndarray, affine: np.ndarray, dtype=np.float32):
    """An (i,j,k) array with its nibabel-style RAS affine as a SimpleITK image (LPS geometry): the inverse of
    :func:`sitk_to_numpy`. The affine must be a rotation times spacing (no shear)."""
    import SimpleITK as sitk

    lps = np.diag([-1.0, -1.0, 1.0])
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    image = sitk.GetImageFromArray(np.asarray(data, dtype=dtype).transpose(2, 1, 0))
    image.SetSpacing(spacing.tolist())
    image.SetDirection((lps @ affine[:3, :3] / spacing).ravel().tolist())
    image.SetOrigin((lps @ affine[:3, 3]).tolist())
    return image


def sitk_to_numpy(image, where: Path) -> tuple[np.ndarray, np.ndarray]:
    """Convert a SimpleITK image to (array in i,j,k order, RAS affine) as nibabel would load it."""
    import SimpleITK as sitk

    if image.GetDimension() != 3:
        raise MslpipeError(f"expected a 3D volume, got {image.GetDimension()}D", where)
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise MslpipeError(f"a colour image ({image.GetNumberOfComponentsPerPixel()} values per voxel), not an MRI "
                           "scan (a screen capture?)", where)
    data = sitk.GetArrayFromImage(image).transpose(2, 1, 0).astype(np.float32)  # z,y,x -> x,y,z
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing(), dtype=float)
    origin = np.asarray(image.GetOrigin(), dtype=float)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    affine = np.eye(4)
    affine[:3, :3] = lps_to_ras @ direction @ np.diag(spacing)
    affine[:3, 3] = lps_to_ras @ origin
    if not np.isfinite(data).all():
        raise MslpipeError("NaN or Inf voxels", where)
    return data, affine
