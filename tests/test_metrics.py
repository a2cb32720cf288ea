"""Metrics on hand-built arrays with known answers, the empty-case rules, and property tests."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from mslpipe import metrics as M
from mslpipe.errors import MslpipeError

SHAPE = (8, 8, 8)


def cube(shape=SHAPE, lo=(0, 0, 0), size=(2, 2, 2)) -> np.ndarray:
    a = np.zeros(shape, np.uint8)
    a[tuple(slice(lo_, lo_ + s) for lo_, s in zip(lo, size, strict=True))] = 1
    return a


# ---------------------------------------------------------------------------- voxel overlap
def test_half_overlapping_cubes():
    ref = cube(lo=(0, 0, 0))
    pred = cube(lo=(0, 0, 1))  # shares 4 of its 8 voxels
    assert M.dice(pred, ref) == pytest.approx(0.5)
    assert M.iou(pred, ref) == pytest.approx(4 / 12)
    assert M.precision(pred, ref) == pytest.approx(0.5)
    assert M.recall(pred, ref) == pytest.approx(0.5)


def test_precision_recall_asymmetric():
    ref = cube(size=(2, 2, 2))  # 8 voxels
    pred = cube(size=(2, 2, 1))  # 4 voxels, all inside ref
    assert M.precision(pred, ref) == 1.0
    assert M.recall(pred, ref) == pytest.approx(0.5)


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError):
        M.dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


# ---------------------------------------------------------------------------- lesion-wise
def three_lesion_case():
    ref = np.zeros((12, 12, 12), np.uint8)
    ref[0:2, 0:2, 0:2] = 1  # lesion A, hit
    ref[5:7, 5:7, 5:7] = 1  # lesion B, hit by one voxel
    ref[10:12, 0:2, 10:12] = 1  # lesion C, missed
    pred = np.zeros_like(ref)
    pred[0:2, 0:2, 0:3] = 1  # overlaps A
    pred[6, 6, 6] = 1  # overlaps B
    pred[0, 10, 0] = 1  # false lesion
    return pred, ref


def test_lesion_detection_isbi_definitions():
    pred, ref = three_lesion_case()
    counts = M.lesion_counts(pred, ref)
    assert counts == {"n_ref_lesions": 3, "n_pred_lesions": 3, "n_detected_ref_lesions": 2,
                      "n_fp_pred_lesions": 1}
    assert M.ltpr(pred, ref) == pytest.approx(2 / 3)
    assert M.lfpr(pred, ref) == pytest.approx(1 / 3)
    assert M.lesion_f1(pred, ref) == pytest.approx(2 / 3)  # P = R = 2/3


def test_one_pred_lesion_covering_two_ref_lesions():
    ref = np.zeros((3, 3, 7), np.uint8)
    ref[1, 1, 1] = ref[1, 1, 5] = 1
    pred = np.zeros_like(ref)
    pred[1, 1, 0:7] = 1
    assert M.lesion_counts(pred, ref)["n_pred_lesions"] == 1
    assert M.ltpr(pred, ref) == 1.0
    assert M.lfpr(pred, ref) == 0.0


def test_connectivity_changes_lesion_count():
    a = np.zeros((3, 3, 3), np.uint8)
    a[0, 0, 0] = a[1, 1, 1] = 1  # corner-touching only
    assert M.label_lesions(a, 26)[1] == 1
    assert M.label_lesions(a, 18)[1] == 2
    assert M.label_lesions(a, 6)[1] == 2
    b = np.zeros((3, 3, 3), np.uint8)
    b[0, 0, 0] = b[1, 1, 0] = 1  # edge-touching
    assert M.label_lesions(b, 18)[1] == 1
    assert M.label_lesions(b, 6)[1] == 2
    with pytest.raises(MslpipeError, match="connectivity"):
        M.label_lesions(a, 8)


# ---------------------------------------------------------------------------- empty cases
def test_both_empty():
    z = np.zeros(SHAPE, np.uint8)
    m = M.case_metrics(z, z, (1, 1, 1))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (1.0, 1.0, 1.0, 1.0)
    assert (m["ltpr"], m["lfpr"], m["lesion_f1"]) == (1.0, 0.0, 1.0)
    assert m["hd95_mm"] == 0.0
    assert m["slice_dice_study"] == 1.0
    assert m["ref_empty"] is True and m["pred_empty"] is True


def test_empty_prediction_of_lesions():
    z, ref = np.zeros(SHAPE, np.uint8), cube()
    m = M.case_metrics(z, ref, (1, 1, 1))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert (m["ltpr"], m["lfpr"], m["lesion_f1"]) == (0.0, 1.0, 0.0)
    assert math.isnan(m["hd95_mm"])
    assert m["ref_empty"] is False and m["pred_empty"] is True


def test_prediction_on_empty_reference():
    pred, z = cube(), np.zeros(SHAPE, np.uint8)
    m = M.case_metrics(pred, z, (1, 1, 1))
    assert (m["dice"], m["iou"], m["precision"], m["recall"]) == (0.0, 0.0, 0.0, 0.0)
    assert (m["ltpr"], m["lfpr"], m["lesion_f1"]) == (0.0, 1.0, 0.0)
    assert math.isnan(m["hd95_mm"])
    assert m["abs_volume_diff_ml"] == pytest.approx(8 / 1000)


# ---------------------------------------------------------------------------- volume, distance
def test_volume_ml_anisotropic():
    a = cube(size=(2, 5, 1))  # 10 voxels × 3 mm³
    assert M.volume_ml(a, (1, 1, 3)) == pytest.approx(0.030)
    assert M.abs_volume_diff_ml(a, cube(size=(1, 1, 1)), (1, 1, 3)) == pytest.approx(0.027)


def test_hd95_single_voxels_anisotropic():
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[2, 2, 2] = 1
    pred[2, 2, 4] = 1
    assert M.hd95(pred, ref, (1, 1, 3)) == pytest.approx(6.0)
    assert M.hd95(pred, ref, (2, 1, 1)) == pytest.approx(2.0)


def test_hd95_shifted_cubes_anisotropic():
    shape = (6, 6, 10)
    ref = cube(shape, lo=(1, 1, 2))  # slices 2, 3
    pred = cube(shape, lo=(1, 1, 5))  # slices 5, 6: 2 and 3 slices away
    # every voxel of a 2×2×2 cube is on its surface; distances 2×3 = 6 mm and 3×3 = 9 mm
    assert M.hd95(pred, ref, (1, 1, 3)) == pytest.approx(9.0)
    d_pr, d_rp = M.surface_distances(pred, ref, (1, 1, 3))
    assert sorted(set(np.round(d_pr, 6))) == [6.0, 9.0]
    assert M.hd95(ref, pred, (1, 1, 3)) == pytest.approx(9.0)


def test_hd95_matches_a_distance_transform_reference():
    from scipy import ndimage

    face = ndimage.generate_binary_structure(3, 1)
    spacing = (1.0, 2.0, 0.7)
    for seed in range(5):
        rng = np.random.default_rng(seed)
        a, b = rng.random((9, 8, 7)) > 0.8, rng.random((9, 8, 7)) > 0.85
        sa = a & ~ndimage.binary_erosion(a, face, border_value=0)
        sb = b & ~ndimage.binary_erosion(b, face, border_value=0)
        d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
        d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
        expected = max(np.percentile(d_ab, 95), np.percentile(d_ba, 95))
        assert M.hd95(a, b, spacing) == pytest.approx(expected)


def test_hd95_ignores_a_few_outlier_voxels():
    ref = np.zeros((40, 40, 40), np.uint8)
    ref[5:35, 5:35, 5:35] = 1
    pred = ref.copy()
    pred[0, 0, 0] = 1  # one far speck among thousands of surface voxels
    assert M.hd95(pred, ref, (1, 1, 1)) == pytest.approx(0.0)


# ---------------------------------------------------------------------------- slice-level Dice
def test_slice_dice_reads_higher_than_volume_dice():
    ref = np.zeros((4, 4, 20), np.uint8)
    ref[0:2, 0:2, 5] = 1  # 4 voxels on slice 5
    pred = np.zeros_like(ref)
    pred[0:2, 0, 5] = 1  # 2 of them
    assert M.dice(pred, ref) == pytest.approx(2 / 3)
    assert M.slice_dice(pred, ref, axis=2) == pytest.approx((19 + 2 / 3) / 20)
    assert M.slice_dice(pred, ref, axis=2) > M.dice(pred, ref)
    # along axis 0: slices 0 and 1 both hold 2 ref voxels and 1 pred voxel; 2 and 3 are empty
    assert M.slice_dice(pred, ref, axis=0) == pytest.approx((2 / 3 + 2 / 3 + 1 + 1) / 4)


# ---------------------------------------------------------------------------- ISBI score
def test_isbi_score_hand_computed():
    rows = [
        {"dice": 0.5, "precision": 0.5, "lfpr": 0.5, "ltpr": 0.5, "pred_volume_ml": 1.0,
         "ref_volume_ml": 2.0},
        {"dice": 1.0, "precision": 1.0, "lfpr": 0.0, "ltpr": 1.0, "pred_volume_ml": 2.0,
         "ref_volume_ml": 4.0},
    ]
    # per scan: 0.375 and 0.75 -> mean 0.5625; Corr = 1 -> +0.25
    out = M.isbi_score(rows)
    assert out["score"] == pytest.approx(0.8125)
    assert out["volume_correlation"] == pytest.approx(1.0)
    assert out["reason"] is None


def test_isbi_score_undefined_correlation():
    row = {"dice": 1.0, "precision": 1.0, "lfpr": 0.0, "ltpr": 1.0, "pred_volume_ml": 1.0,
           "ref_volume_ml": 1.0}
    one = M.isbi_score([row])
    assert math.isnan(one["score"]) and "fewer than 2" in one["reason"]
    assert one["partial"] == pytest.approx(0.75)
    flat = M.isbi_score([row, dict(row)])
    assert math.isnan(flat["score"]) and "do not vary" in flat["reason"]


def test_volume_correlation_matches_numpy():
    rng = np.random.default_rng(0)
    x, y = rng.random(7), rng.random(7)
    assert M.volume_correlation(x, y) == pytest.approx(np.corrcoef(x, y)[0, 1])
    assert math.isnan(M.volume_correlation([1.0], [2.0]))


def test_case_metrics_keys():
    pred, ref = three_lesion_case()
    m = M.case_metrics(pred, ref, (1, 1, 3))
    assert set(m) == {
        "dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "n_ref_lesions",
        "n_pred_lesions", "n_detected_ref_lesions", "n_fp_pred_lesions", "ref_volume_ml",
        "pred_volume_ml", "abs_volume_diff_ml", "hd95_mm", "slice_dice_study", "ref_empty",
        "pred_empty",
    }
    assert all(type(v) in (float, int, bool) for v in m.values())


# ---------------------------------------------------------------------------- lesions by size
def test_lesion_counts_by_size_known_lesions():
    shape = (40, 40, 12)
    ref = (cube(shape, (1, 1, 1), (1, 1, 1)) + cube(shape, (5, 5, 1), (3, 3, 3))       # 1 and 27 mm³
           + cube(shape, (12, 1, 1), (5, 5, 5)) + cube(shape, (20, 20, 1), (8, 8, 8))  # 125 and 512 mm³
           + cube(shape, (1, 20, 1), (11, 11, 11)))                                    # 1331 mm³
    pred = (cube(shape, (6, 6, 2), (1, 1, 1)) + cube(shape, (2, 22, 3), (2, 2, 2))     # hit the 27 and 1331
            + cube(shape, (30, 1, 1), (1, 1, 1)) + cube(shape, (30, 5, 1), (4, 4, 4)))  # false: 1 and 64 mm³
    by_size = M.lesion_counts_by_size(pred, ref, (1.0, 1.0, 1.0))
    assert [b["n_ref_lesions"] for b in by_size] == [1, 1, 1, 1, 1]
    assert [b["n_detected_ref_lesions"] for b in by_size] == [0, 1, 0, 0, 1]
    assert [b["n_pred_lesions"] for b in by_size] == [3, 0, 1, 0, 0]  # 1 + 8 mm³ hits and the 1 mm³ speck
    assert [b["n_fp_pred_lesions"] for b in by_size] == [1, 0, 1, 0, 0]
    whole = M.lesion_counts(pred, ref)
    for key, n in whole.items():
        assert sum(b[key] for b in by_size) == n


def test_lesion_size_follows_the_voxel_size_and_edges():
    one = cube((8, 8, 8), (1, 1, 1), (2, 2, 2))  # 8 voxels
    assert [b["n_ref_lesions"] for b in M.lesion_counts_by_size(one, one, (1, 1, 1))] == [1, 0, 0, 0, 0]
    assert [b["n_ref_lesions"] for b in M.lesion_counts_by_size(one, one, (1, 1, 3))] == [0, 1, 0, 0, 0]
    # a lesion of exactly an edge's volume belongs to the class above it
    assert [b["n_ref_lesions"] for b in M.lesion_counts_by_size(one, one, (1, 1, 1), edges_mm3=(8,))] == [0, 1]
    assert len(M.lesion_counts_by_size(one, one, (1, 1, 1), edges_mm3=())) == 1  # no edges: one class
    for bad in ((10, 5), (0, 10), (10, float("nan")), ((1, 2),)):
        with pytest.raises(ValueError, match="edges"):
            M.lesion_counts_by_size(one, one, (1, 1, 1), edges_mm3=bad)


def test_pool_counts_by_size_sums_and_leaves_empty_classes_undefined():
    scan = lambda r, d, p, f: {"n_ref_lesions": r, "n_detected_ref_lesions": d,  # noqa: E731
                               "n_pred_lesions": p, "n_fp_pred_lesions": f}
    pooled = M.pool_counts_by_size([[scan(2, 1, 4, 3), scan(0, 0, 0, 0)], [scan(2, 2, 1, 0), scan(0, 0, 0, 0)]],
                                   edges_mm3=(10,))
    assert pooled[0] == {"from_mm3": 0.0, "to_mm3": 10.0, "n_ref_lesions": 4, "n_detected_ref_lesions": 3,
                         "n_pred_lesions": 5, "n_fp_pred_lesions": 3, "ltpr": 0.75, "fp_fraction": 0.6}
    assert pooled[1]["to_mm3"] is None and pooled[1]["ltpr"] is None and pooled[1]["fp_fraction"] is None


# ---------------------------------------------------------------------------- properties
masks = arrays(np.bool_, (4, 5, 3))


@settings(max_examples=60, deadline=None)
@given(masks, masks)
def test_dice_iou_symmetric_and_bounded(a, b):
    for f in (M.dice, M.iou):
        v = f(a, b)
        assert 0.0 <= v <= 1.0
        assert v == pytest.approx(f(b, a))


@settings(max_examples=60, deadline=None)
@given(masks)
def test_identical_and_disjoint(a):
    assume(a.any() and not a.all())
    assert M.dice(a, a) == 1.0 and M.iou(a, a) == 1.0
    assert M.dice(a, ~a) == 0.0 and M.iou(a, ~a) == 0.0


@settings(max_examples=40, deadline=None)
@given(masks, masks, st.sampled_from([0, 1, 2]), st.sampled_from([6, 18, 26]))
def test_lesion_counts_invariant_under_flips(a, b, axis, conn):
    flipped = M.lesion_counts(np.flip(a, axis), np.flip(b, axis), conn)
    assert flipped == M.lesion_counts(a, b, conn)


@settings(max_examples=40, deadline=None)
@given(masks, masks, st.sampled_from([6, 26]))
def test_lesions_by_size_add_up_to_lesion_counts(a, b, conn):
    by_size = M.lesion_counts_by_size(a, b, (1.0, 2.0, 0.5), edges_mm3=(1.5, 4), connectivity=conn)
    for key, n in M.lesion_counts(a, b, conn).items():
        assert sum(c[key] for c in by_size) == n


@settings(max_examples=30, deadline=None)
@given(masks, masks)
def test_case_metrics_from_given_size_counts_match_its_own(a, b):
    spacing = (1.0, 2.0, 0.5)
    given = M.case_metrics(a, b, spacing, counts_by_size=M.lesion_counts_by_size(a, b, spacing))
    own = M.case_metrics(a, b, spacing)
    assert given.keys() == own.keys()
    for key, value in own.items():
        assert given[key] == value or (isinstance(value, float) and math.isnan(value) and math.isnan(given[key]))
