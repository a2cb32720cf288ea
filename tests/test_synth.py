"""Tests for mslpipe.synth: the synthetic ISBI-layout data set."""

from __future__ import annotations

import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, load_mask, read_json
from mslpipe.synth import make_dataset

TINY = (32, 36, 24)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, list[Path]]:
    out = tmp_path_factory.mktemp("synth")
    return out, make_dataset(out, subjects=2, timepoints=2, shape=TINY, seed=0)


def _mask_path(image: Path, rater: int) -> Path:
    name = image.name.replace("_flair_pp.nii.gz", f"_mask{rater}.nii.gz")
    return image.parent.parent / "masks" / name


def _scans(out: Path):
    """(subject truth, time point truth, image, mask1, mask2) for every scan."""
    for subject in read_json(out / "synth_truth.json")["subjects"]:
        for tp in subject["timepoints"]:
            image, _ = load_image(out / tp["image"])
            masks = [load_mask(out / m) for m in tp["masks"]]
            yield subject, tp, image, masks[0], masks[1] if len(masks) > 1 else None


def _distance(shape, lesion: dict) -> np.ndarray:
    """Normalised distance to a truth lesion's centre (1 on its ellipsoid)."""
    rel = np.indices(shape, dtype=float) - np.asarray(lesion["centre"], dtype=float)[:, None, None, None]
    proj = np.tensordot(np.asarray(lesion["axes"], dtype=float), rel, 1)
    radii = np.asarray(lesion["radii"], dtype=float)[:, None, None, None]
    return np.sqrt(((proj / radii) ** 2).sum(0))


def _ellipsoid(shape, lesion: dict) -> np.ndarray:
    return _distance(shape, lesion) <= 1.0


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def test_layout_and_names(dataset):
    out, paths = dataset
    expected = []
    for s in (1, 2):
        for t in (1, 2):
            subj = out / "training" / f"training{s:02d}"
            expected.append(subj / "preprocessed" / f"training{s:02d}_{t:02d}_flair_pp.nii.gz")
    assert paths == expected
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    wanted = {"synth_truth.json"}
    for p in expected:
        wanted |= {p.relative_to(out).as_posix()}
        wanted |= {_mask_path(p, r).relative_to(out).as_posix() for r in (1, 2)}
    assert files == wanted  # no temporary files left behind either


def test_images_and_masks_share_grid(dataset):
    out, paths = dataset
    for subject, tp, image, mask1, mask2 in _scans(out):
        img = nib.load(out / tp["image"])
        assert img.get_data_dtype() == np.float32
        assert image.shape == TINY
        affine = img.affine
        np.testing.assert_allclose(affine, subject["affine"], atol=1e-5)
        assert affine[0, 0] < 0 and affine[1, 1] > 0 and affine[2, 2] > 0  # LAS-like
        assert np.allclose(np.abs(np.diag(affine)[:3]), 1.0)  # 1 mm isotropic
        for rater, mask in ((1, mask1), (2, mask2)):
            path = out / tp["masks"][rater - 1]
            assert nib.load(path).get_data_dtype() == np.uint8
            assert set(np.unique(mask)) <= {0, 1}
            load_mask(path, like_shape=image.shape, like_affine=affine)  # raises if off-grid
        assert image.min() >= 0.0 and image[0, 0, 0] == 0.0  # skull-stripped: zero background
    # every scan of a subject has the same affine, subjects differ
    affines = {tuple(np.round(nib.load(p).affine.ravel(), 4)) for p in paths}
    assert len(affines) == 2


def test_deterministic_per_seed(tmp_path, dataset):
    out, paths = dataset
    again = make_dataset(tmp_path / "same", subjects=2, timepoints=2, shape=TINY, seed=0)
    other = make_dataset(tmp_path / "other", subjects=2, timepoints=2, shape=TINY, seed=1)
    for a, b, c in zip(paths, again, other, strict=True):
        for rater in (0, 1, 2):
            pa, pb, pc = ((p if rater == 0 else _mask_path(p, rater)) for p in (a, b, c))
            da, db, dc = (np.asanyarray(nib.load(p).dataobj) for p in (pa, pb, pc))
            assert da.tobytes() == db.tobytes()
            if rater == 0:
                assert da.tobytes() != dc.tobytes()
    assert read_json(out / "synth_truth.json") == read_json(tmp_path / "same" / "synth_truth.json")
    assert read_json(out / "synth_truth.json") != read_json(tmp_path / "other" / "synth_truth.json")


def test_raters_differ_only_at_borders(dataset):
    out, _ = dataset
    dices = []
    for _, _, _, mask1, mask2 in _scans(out):
        m1, m2 = mask1.astype(bool), mask2.astype(bool)
        assert ndi.label(m1)[1] == ndi.label(m2)[1] >= 1  # same lesions
        border = ndi.binary_dilation(m1) & ~ndi.binary_erosion(m1)
        assert not ((m1 ^ m2) & ~border).any()  # disagreement only one voxel in or out
        dices.append(_dice(m1, m2))
    assert all(0.7 < d < 1.0 for d in dices), dices


def test_lesions_are_hyperintense(dataset):
    out, _ = dataset
    for _, tp, image, mask1, _ in _scans(out):
        lesion = mask1.astype(bool)
        brain = (image > 0) & ~lesion
        assert image[lesion].mean() > 1.3 * image[brain].mean()
        assert np.median(image[lesion]) > np.percentile(image[brain], 95)
        assert 50 <= tp["scale"] <= 400


def test_mask1_is_the_truth(dataset):
    out, _ = dataset
    for _, tp, _, mask1, _ in _scans(out):
        union = np.zeros(TINY, dtype=bool)
        on_surface = np.zeros(TINY, dtype=bool)  # float32 vs float64 may round these either way
        for lesion in tp["lesions"]:
            d = _distance(TINY, lesion)
            assert (d <= 1.0).any()
            union |= d <= 1.0
            on_surface |= np.abs(d - 1.0) < 1e-5
        assert not ((union ^ mask1.astype(bool)) & ~on_surface).any()
        assert 1 <= len(tp["lesions"]) <= 12


def test_longitudinal_truth(dataset):
    out, _ = dataset
    statuses = set()
    for subject in read_json(out / "synth_truth.json")["subjects"]:
        t1, t2 = subject["timepoints"]
        assert {les["status"] for les in t1["lesions"]} == {"baseline"}
        before = {les["id"]: les for les in t1["lesions"]}
        mask_t1 = load_mask(out / t1["masks"][0]).astype(bool)
        mask_t2 = load_mask(out / t2["masks"][0]).astype(bool)
        ids_t2 = [les["id"] for les in t2["lesions"]]
        assert len(set(ids_t2)) == len(ids_t2) and set(before) <= set(ids_t2)  # lesions persist
        for les in t2["lesions"]:
            statuses.add(les["status"])
            region = _ellipsoid(TINY, les)
            if les["status"] == "new":
                assert les["id"] not in before
                assert not (region & mask_t1).any()
                assert region[mask_t2].any()
                continue
            old = before[les["id"]]
            if les["status"] == "stable":
                assert les["radii"] == old["radii"] and les["centre"] == old["centre"]
            else:
                assert les["status"] == "growing"
                ratio = np.asarray(les["radii"]) / np.asarray(old["radii"])
                assert np.all(ratio > 1.19) and np.all(ratio < 1.51)
                old_region = _ellipsoid(TINY, old)
                assert (mask_t2 & region).sum() > (mask_t1 & old_region).sum()
    assert {"new", "growing"} <= statuses


def test_one_rater_writes_no_mask2(tmp_path):
    paths = make_dataset(tmp_path, subjects=1, timepoints=2, shape=TINY, seed=3, raters=1)
    for p in paths:
        assert _mask_path(p, 1).exists()
        assert not _mask_path(p, 2).exists()
    truth = read_json(tmp_path / "synth_truth.json")
    assert truth["raters"] == 1
    assert all(len(tp["masks"]) == 1 for tp in truth["subjects"][0]["timepoints"])


def test_isbi_shape(tmp_path):
    start = time.perf_counter()
    (path,) = make_dataset(tmp_path, subjects=1, timepoints=1, shape=(181, 217, 181), seed=0)
    assert time.perf_counter() - start < 30
    image, affine = load_image(path)
    mask = load_mask(_mask_path(path, 1), like_shape=image.shape, like_affine=affine)
    assert image.shape == (181, 217, 181)
    assert ndi.label(mask)[1] >= 1
    assert image[mask.astype(bool)].mean() > 1.3 * image[(image > 0) & (mask == 0)].mean()


def test_default_dataset_is_fast(tmp_path):
    start = time.perf_counter()
    paths = make_dataset(tmp_path)
    assert time.perf_counter() - start < 10  # about 0.4 s on a laptop core; loose for slow CI
    assert len(paths) == 8
    assert nib.load(paths[0]).shape == (64, 72, 48)


@pytest.mark.parametrize(
    "kwargs",
    [{"raters": 3}, {"shape": (8, 72, 48)}, {"shape": (64, 72)}, {"subjects": 0}, {"timepoints": 0}],
)
def test_rejects_bad_arguments(tmp_path, kwargs):
    with pytest.raises(MslpipeError):
        make_dataset(tmp_path, **kwargs)


def test_synth_never_writes_over_a_dataset(tmp_path):
    """`synth raw_data/isbi` by mistake replaced real scans in silence; a folder that holds a dataset is refused and
    left as it was."""
    make_dataset(tmp_path / "syn", subjects=1, timepoints=1, shape=(24, 24, 24))
    scan = next((tmp_path / "syn" / "training").rglob("*_flair_pp.nii.gz"))
    scan.write_bytes(b"precious")
    with pytest.raises(MslpipeError, match="already holds one") as info:
        make_dataset(tmp_path / "syn", subjects=1, timepoints=1, shape=(24, 24, 24))
    assert info.value.path == str(tmp_path / "syn") and scan.read_bytes() == b"precious"
