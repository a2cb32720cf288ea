"""remove_small_components, binarize and lesion_table on tiny hand-built masks."""

from __future__ import annotations

import numpy as np
import pytest

from mslpipe.errors import MslpipeError
from mslpipe.postprocess import binarize, lesion_table, remove_small_components


def test_size_is_in_mm3_with_anisotropic_spacing():
    m = np.zeros((6, 6, 6), np.uint8)
    m[1:3, 1, 1] = 1  # 2×1×1 voxels = 6 mm³ at spacing (1, 1, 3)
    kept = remove_small_components(m, (1, 1, 3), 6)
    assert kept.dtype == np.uint8 and np.array_equal(kept, m)
    assert not remove_small_components(m, (1, 1, 3), 6.5).any()
    # the same component is only 2 mm³ at isotropic 1 mm
    assert not remove_small_components(m, (1, 1, 1), 3).any()


def test_connectivity_6_vs_26_on_diagonal_voxels():
    m = np.zeros((4, 4, 4), np.uint8)
    m[1, 1, 1] = m[2, 2, 2] = 1  # two 3 mm³ voxels touching at a corner
    assert np.array_equal(remove_small_components(m, (1, 1, 3), 5, connectivity=26), m)
    assert not remove_small_components(m, (1, 1, 3), 5, connectivity=6).any()


def test_many_lesions_kept_not_only_the_largest():
    m = np.zeros((20, 20, 20), np.uint8)
    m[0:2, 0:2, 0:2] = 1  # 8
    m[5:8, 5:8, 5:8] = 1  # 27
    m[12:14, 0:2, 12:14] = 1  # 8
    m[18, 18, 18] = 1  # 1: the only one below 4
    out = remove_small_components(m, (1, 1, 1), 4)
    expected = m.copy()
    expected[18, 18, 18] = 0
    assert np.array_equal(out, expected)


def test_min_size_zero_is_a_no_op():
    rng = np.random.default_rng(1)
    m = (rng.random((6, 6, 6)) > 0.7).astype(np.uint8)
    out = remove_small_components(m, (1, 1, 3), 0)
    assert out.dtype == np.uint8 and np.array_equal(out, m)


def test_invalid_arguments():
    m = np.ones((2, 2, 2), np.uint8)
    with pytest.raises(MslpipeError, match="minimum lesion size"):
        remove_small_components(m, (1, 1, 1), -1)
    with pytest.raises(MslpipeError, match="connectivity"):
        remove_small_components(m, (1, 1, 1), 1, connectivity=4)


def test_binarize():
    prob = np.array([[[0.1, 0.5, 0.9]]], np.float32)
    out = binarize(prob, 0.5)
    assert out.dtype == np.uint8 and out.tolist() == [[[0, 1, 1]]]
    with pytest.raises(MslpipeError):
        binarize(prob, float("nan"))


def test_lesion_table_world_coordinates():
    affine = np.array([[0.0, -2.0, 0.0, 10.0],
                       [1.0, 0.0, 0.0, -5.0],
                       [0.0, 0.0, 3.0, 7.0],
                       [0.0, 0.0, 0.0, 1.0]])  # |det| = 6 mm³ per voxel
    m = np.zeros((5, 5, 5), np.uint8)
    m[1:3, 2, 3] = 1  # lesion 1: centroid voxel (1.5, 2, 3)
    m[4, 4, 0] = 1  # lesion 2
    rows = lesion_table(m, affine)
    assert [r["label"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["n_voxels"] == 2
    assert first["volume_mm3"] == pytest.approx(12.0)
    assert first["centroid_voxel"] == pytest.approx([1.5, 2.0, 3.0])
    # x = -2*j + 10 = 6, y = i - 5 = -3.5, z = 3*k + 7 = 16
    assert first["centroid_mm"] == pytest.approx([6.0, -3.5, 16.0])
    assert first["slice_range"] == [[1, 2], [2, 2], [3, 3]]
    assert rows[1]["volume_mm3"] == pytest.approx(6.0)
    assert rows[1]["centroid_mm"] == pytest.approx([2.0, -1.0, 7.0])
    assert lesion_table(np.zeros((3, 3, 3)), affine) == []
    assert "mean_probability" not in first  # only with a probability map


def test_lesion_table_probabilities():
    m = np.zeros((5, 5, 5), np.uint8)
    m[1:3, 2, 3] = 1
    m[4, 4, 0] = 1
    prob = np.full(m.shape, 0.9, np.float32)  # outside the lesions: never counted
    prob[1, 2, 3], prob[2, 2, 3], prob[4, 4, 0] = 0.6, 0.8, 0.55
    rows = lesion_table(m, np.eye(4), probability=prob)
    assert rows[0]["mean_probability"] == pytest.approx(0.7) and rows[0]["max_probability"] == pytest.approx(0.8)
    assert rows[1]["mean_probability"] == pytest.approx(0.55) and rows[1]["max_probability"] == pytest.approx(0.55)
    with pytest.raises(ValueError, match="probability shape"):
        lesion_table(m, np.eye(4), probability=prob[:4])
