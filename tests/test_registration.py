"""Rigid registration of a follow-up scan to its baseline: a known move is undone, on other grids too."""

from __future__ import annotations

import numpy as np
import pytest

from mslpipe import registration
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, numpy_to_sitk


def _moved(data: np.ndarray, affine: np.ndarray, degrees: float, shift_mm, out_affine=None, linear=True):
    """``data`` seen through a known rigid move (about the volume's centre), on ``out_affine``'s grid."""
    import SimpleITK as sitk

    image = numpy_to_sitk(data, affine)
    move = sitk.Euler3DTransform()
    move.SetCenter(image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()]))
    move.SetRotation(0.0, 0.0, np.radians(degrees))
    move.SetTranslation(tuple(float(v) for v in shift_mm))
    grid = numpy_to_sitk(np.zeros(data.shape, np.float32), affine if out_affine is None else out_affine)
    out = sitk.Resample(image, grid, move, sitk.sitkLinear if linear else sitk.sitkNearestNeighbor, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture
def scan_and_mask(synth_root):
    image = next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz"))
    mask = image.parent.parent / "masks" / image.name.replace("_flair_pp", "_mask1")
    (data, affine), (lesions, _) = load_image(image), load_image(mask)
    assert lesions.sum() > 20
    return data, affine, lesions


@pytest.mark.parametrize("other_grid", [False, True])
def test_a_known_move_is_undone(scan_and_mask, other_grid):
    """The follow-up is the baseline turned by 5 degrees and shifted by a few mm (and, in the second case, stored
    on a grid with another origin): registered back, its lesions land on the baseline's."""
    data, affine, lesions = scan_and_mask
    follow_affine = affine.copy()
    if other_grid:
        follow_affine[:3, 3] += (7.0, -4.0, 3.0)
    follow = _moved(data, affine, 5.0, (3.0, -2.0, 1.0), follow_affine)
    follow_lesions = _moved(lesions, affine, 5.0, (3.0, -2.0, 1.0), follow_affine, linear=False)
    assert _dice(follow_lesions, lesions) < 0.3  # not on one grid as they are
    rigid = registration.register_rigid(data, affine, follow, follow_affine)
    back = registration.resample_mask(follow_lesions, follow_affine, data.shape, affine, rigid)
    assert back.shape == data.shape and back.dtype == np.uint8
    assert _dice(back, lesions) > 0.9
    assert abs(abs(rigid.rotation_deg[2]) - 5.0) < 1.0 and max(abs(v) for v in rigid.rotation_deg[:2]) < 1.0
    assert rigid.correlation_after > 0.9 > rigid.correlation_before
    image_back = registration.resample_image(follow, follow_affine, data.shape, affine, rigid)
    assert np.corrcoef(image_back[data > 0], data[data > 0])[0, 1] > 0.9


def test_the_transform_file_reads_back(scan_and_mask, tmp_path):
    import SimpleITK as sitk

    data, affine, _ = scan_and_mask
    rigid = registration.register_rigid(data, affine, _moved(data, affine, 3.0, (2.0, 0.0, 0.0)), affine)
    path = registration.write_transform(rigid, tmp_path / "t.tfm")
    assert np.allclose(sitk.ReadTransform(str(path)).GetParameters(), rigid.transform.GetParameters())
    assert [p.name for p in tmp_path.iterdir()] == ["t.tfm"]  # no temporary file left


def test_an_empty_scan_is_refused(scan_and_mask):
    data, affine, _ = scan_and_mask
    with pytest.raises(MslpipeError, match="cannot register an empty scan"):
        registration.register_rigid(data, affine, np.zeros_like(data), affine, where="followup.nii.gz")


def test_real_visits_already_aligned_stay_put(real_data):
    """training03's visits are already registered to MNI space: aligning them again moves nothing to speak of."""
    folder = real_data / "training" / "training03" / "preprocessed"
    (first, a1), (second, a2) = (load_image(p) for p in sorted(folder.glob("*_flair_pp.nii*"))[:2])
    rigid = registration.register_rigid(first, a1, second, a2)
    assert max(abs(v) for v in rigid.rotation_deg) < 1.0 and max(abs(v) for v in rigid.translation_mm) < 1.0
    assert rigid.correlation_after >= rigid.correlation_before - 0.01 and rigid.correlation_after > 0.8


def test_a_registration_worse_than_the_scanner_coordinates_is_not_used(scan_and_mask, monkeypatch, caplog):
    """Where the optimiser's transform correlates the brains less than the scanner coordinates already did (e.g. a
    coarser follow-up on the same grid), the identity is kept, said in the log and in the summary."""
    data, affine, _ = scan_and_mask
    values = iter([0.74, 0.69])  # before, after
    monkeypatch.setattr(registration, "_correlation", lambda *args: next(values))
    rigid = registration.register_rigid(data, affine, _moved(data, affine, 3.0, (2.0, 0.0, 0.0)), affine)
    assert rigid.kept_scanner_alignment and rigid.rotation_deg == (0.0, 0.0, 0.0)
    assert rigid.transform.GetParameters() == (0.0,) * 6
    assert rigid.correlation_after == rigid.correlation_before == 0.74
    assert rigid.summary()["kept_scanner_alignment"] is True and "kept the scanner coordinates" in caplog.text
    from mslpipe import tables

    assert "kept those" in tables.registration_text(rigid.summary())


def test_an_inverted_contrast_keeps_the_alignment_found_and_says_so(scan_and_mask, caplog):
    """The follow-up's contrast inverted inside the head: mutual information still finds the move; the alignment
    correlates strongly negatively, which is no reason to fall back to the scanner coordinates (a 5 degree
    misalignment), and the log says the contrasts differ."""
    data, affine, _ = scan_and_mask
    moved = _moved(data, affine, 5.0, (3.0, -2.0, 1.0))
    inverted = np.where(moved > 0, moved.max() - moved, 0).astype(np.float32)
    with caplog.at_level("WARNING"):
        rigid = registration.register_rigid(data, affine, inverted, affine)
    assert not rigid.kept_scanner_alignment and abs(abs(rigid.rotation_deg[2]) - 5.0) < 1.0
    assert rigid.correlation_after < -0.5 and "correlate negatively" in caplog.text


def test_a_scan_of_one_value_is_refused(scan_and_mask):
    data, affine, _ = scan_and_mask
    with pytest.raises(MslpipeError, match="cannot register an empty scan"):
        registration.register_rigid(data, affine, np.full_like(data, 100.0), affine, where="followup.nii.gz")


def test_the_mask_moves_by_its_probabilities_without_shrinking(scan_and_mask):
    """A follow-up mask thresholded from a smooth probability map, moved by a known rotation: mapped back by its
    map, the lesions keep their volume within 2 %; the 0/1 mask interpolated and cut at 0.5 loses more."""
    from scipy import ndimage

    data, affine, _ = scan_and_mask
    grid = np.indices(data.shape).astype(np.float32)
    centres = [(12, 14, 10), (26, 28, 16), (20, 30, 22)]  # inside the synthetic brain (40 x 44 x 32)
    prob = np.zeros(data.shape, np.float32)
    for c, r in zip(centres, (2.5, 3.5, 4.5), strict=True):  # balls with soft borders
        dist = np.sqrt(sum((grid[a] - c[a]) ** 2 for a in range(3)))
        prob = np.maximum(prob, 1.0 / (1.0 + np.exp(np.clip(2.0 * (dist - r), -50, 50))))
    prob = ndimage.gaussian_filter(prob, 0.5)
    follow_affine = affine.copy()
    rigid = registration.register_rigid(data, affine, _moved(data, affine, 7.0, (2.5, -1.5, 0.5)), follow_affine)
    moved_prob = _moved(prob, affine, 7.0, (2.5, -1.5, 0.5))
    moved_mask = (moved_prob >= 0.5).astype(np.uint8)
    by_map = registration.resample_mask(moved_mask, affine, data.shape, affine, rigid, probability=moved_prob)
    by_mask = registration.resample_mask(moved_mask, affine, data.shape, affine, rigid)
    truth = int(moved_mask.sum())
    assert abs(int(by_map.sum()) - truth) < 0.02 * truth
    assert abs(int(by_map.sum()) - truth) < abs(int(by_mask.sum()) - truth)
    assert _dice(by_map, prob >= 0.5) > 0.9


def test_coverage_is_the_follow_ups_field_of_view_on_the_baseline_grid(scan_and_mask):
    import SimpleITK as sitk

    data, affine, _ = scan_and_mask
    top = affine.copy()
    top[:3, 3] += affine[:3, 2] * 10  # the follow-up starts 10 slices higher and has 20 fewer
    covered = registration.coverage((data.shape[0], data.shape[1], data.shape[2] - 20), top, data.shape, affine,
                                    sitk.Transform())
    assert not covered[:, :, :10].any() and covered[:, :, 10:data.shape[2] - 10].all()
    assert not covered[:, :, data.shape[2] - 10:].any()
