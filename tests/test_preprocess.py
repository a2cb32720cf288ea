"""preprocess: normalisation, rater policies, and the geometry of preprocess/restore."""

from __future__ import annotations

import time

import numpy as np
import pytest

from mslpipe.brainmask import brain_mask
from mslpipe.errors import MslpipeError
from mslpipe.plans import Plan
from mslpipe.preprocess import (
    combine_raters,
    preprocess_volume,
    restore,
    with_context,
)

SHAPE = (24, 28, 20)
CENTRE = np.array([11.5, 13.5, 9.5])


def _ball(radius: float = 9.0, shape=SHAPE, centre=CENTRE) -> np.ndarray:
    grid = np.indices(shape).astype(float)
    r = np.sqrt(((grid - np.asarray(centre)[:, None, None, None]) ** 2).sum(0))
    return r <= radius


def _head(seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """A textured ball 'brain' on a zero background (RAS grid), and two raters' lesion masks."""
    rng = np.random.default_rng(seed)
    ball = _ball()
    image = np.where(ball, 100 + 20 * rng.random(SHAPE), 0).astype(np.float32)
    # lesions off-centre so that any flip or transpose would move them
    m1 = np.zeros(SHAPE, np.uint8)
    m1[5:8, 10:13, 6:8] = 1
    m1[14:16, 18:20, 12:15] = 1
    m1[12, 6, 9] = 1
    m2 = m1.copy()
    m2[12, 6, 9] = 0
    m2[7:9, 12:14, 7:9] = 1
    for m in (m1, m2):
        assert not (m.astype(bool) & ~ball).any()
        image[m.astype(bool)] += 60
    return image, m1, [m1, m2]


def _affine_ras() -> np.ndarray:
    a = np.diag([0.9, 1.1, 2.0, 1.0])
    a[:3, 3] = [-10.0, 20.0, -5.0]
    return a


def _flip(data: np.ndarray, affine: np.ndarray, axis: int):
    """The same image in world space, stored with ``axis`` reversed."""
    n = data.shape[axis]
    new = affine.copy()
    new[:3, axis] = -affine[:3, axis]
    new[:3, 3] = affine[:3, 3] + affine[:3, axis] * (n - 1)
    return np.flip(data, axis).copy(), new


def _permute(data: np.ndarray, affine: np.ndarray, order: tuple[int, int, int]):
    """The same image in world space, stored with voxel axes in ``order``."""
    new = affine.copy()
    new[:, :3] = affine[:, list(order)]
    return np.transpose(data, order).copy(), new


def _variants():
    """(name, transform) pairs: each maps (data, affine) to an equivalent non-canonical storage."""

    def las(d, a):
        return _flip(d, a, 0)

    def lps(d, a):
        return _flip(*_flip(d, a, 0), 1)

    def permuted(d, a):  # stored as (j, k, i): axis codes A, S, R
        return _permute(d, a, (1, 2, 0))

    def permuted_flipped(d, a):  # axis codes S, L, P
        return _flip(*_flip(*_permute(d, a, (2, 0, 1)), 1), 2)

    return [("RAS", lambda d, a: (d, a)), ("LAS", las), ("LPS", lps), ("ASR", permuted),
            ("SLP", permuted_flipped)]


# ---------------------------------------------------------------------------- brain mask
def test_combine_raters_policies():
    a = np.array([[[0, 1, 1, 0]]], np.uint8)
    b = np.array([[[0, 0, 1, 1]]], np.uint8)
    np.testing.assert_array_equal(combine_raters([a, b], "mean"), [[[0, 0.5, 1, 0.5]]])
    np.testing.assert_array_equal(combine_raters([a, b], "union"), [[[0, 1, 1, 1]]])
    np.testing.assert_array_equal(combine_raters([a, b], "intersection"), [[[0, 0, 1, 0]]])
    np.testing.assert_array_equal(combine_raters([a, b], "mask1"), a)
    np.testing.assert_array_equal(combine_raters([b, a], "mask1"), b)
    for policy in ("mean", "union", "intersection", "mask1"):
        out = combine_raters([a], policy)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, a)


def test_combine_raters_unknown_policy():
    a = np.zeros((2, 2, 2), np.uint8)
    with pytest.raises(MslpipeError, match="unknown label policy 'vote'"):
        combine_raters([a, a], "vote")


# ---------------------------------------------------------------------------- preprocess + restore
@pytest.mark.parametrize("slice_axis", [0, 1, 2])
@pytest.mark.parametrize("variant", _variants(), ids=lambda v: v[0])
def test_preprocess_and_restore_on_non_canonical_grids(variant, slice_axis):
    """The key geometry test: any storage of the same world image preprocesses to the same arrays,
    and restoring the preprocessed label gives back each storage's own mask exactly."""
    name, transform = variant
    image, mask1, masks = _head()
    affine = _affine_ras()
    plan = Plan(dataset="t", slice_axis=slice_axis, crop_margin=2, label_policy="mask1")
    ref_image, ref_label, ref_props = preprocess_volume([image], affine, plan, [mask1])

    img_v, aff_v = transform(image, affine)
    mask_v, aff_m = transform(mask1, affine)
    np.testing.assert_allclose(aff_v, aff_m)
    out_image, label, props = preprocess_volume([img_v], aff_v, plan, [mask_v])

    # same world image → same network input, whatever the storage order
    np.testing.assert_array_equal(out_image, ref_image)
    np.testing.assert_array_equal(label, ref_label)
    assert props["crop_box"] == ref_props["crop_box"]
    assert props["canonical_shape"] == list(SHAPE)
    np.testing.assert_allclose(props["spacing_canonical"], [0.9, 1.1, 2.0])
    assert props["shape"] == list(img_v.shape) and props["slice_axis"] == slice_axis
    # shapes: S × C × H × W
    box = np.array(props["crop_box"])
    sizes = box[:, 1] - box[:, 0]
    assert out_image.shape[1] == 1
    assert out_image.shape[0] == sizes[slice_axis] == label.shape[0]
    assert list(out_image.shape[2:]) == [s for i, s in enumerate(sizes) if i != slice_axis]

    # the round trip: exactly the original mask, in the original storage order
    back = restore(label, props)
    assert back.shape == img_v.shape
    np.testing.assert_array_equal(back, mask_v)
    # the image comes back on the original grid too: non-zero only inside the (stored) brain
    back_image = restore(out_image[:, 0], props)
    brain_v = transform(brain_mask(image), affine)[0]
    assert back_image.shape == img_v.shape
    assert (back_image[~brain_v] == 0).all()
    assert np.count_nonzero(back_image) >= 0.95 * brain_v.sum()
    # the brightest voxels (lesions) come back where they were
    assert set(map(tuple, np.argwhere(back_image >= back_image.max() - 1e-6))) <= set(
        map(tuple, np.argwhere(mask_v > 0)))


def test_preprocess_volume_crops_to_brain_and_puts_ras_first():
    image, mask1, masks = _head()
    plan = Plan(dataset="t", slice_axis=2, crop_margin=1, label_policy="union")
    out, label, props = preprocess_volume([image], _affine_ras(), plan, masks)
    brain = brain_mask(image)
    coords = np.argwhere(brain)
    lo, hi = coords.min(0), coords.max(0) + 1
    assert props["crop_box"] == [[int(a) - 1, int(b) + 1] for a, b in zip(lo, hi, strict=True)]
    assert props["brain_voxels"] == int(brain.sum())
    union = np.maximum(masks[0], masks[1])
    np.testing.assert_array_equal(restore(label, props), union)
    # LAS input: the voxel at the largest stored i is the most left, so lands at canonical i = 0
    las_img, las_aff = _flip(image, _affine_ras(), 0)
    _, _, las_props = preprocess_volume([las_img], las_aff, plan)
    assert las_props["ornt"] == [[0.0, -1.0], [1.0, 1.0], [2.0, 1.0]]


def test_preprocess_volume_mean_policy_and_two_channels():
    image, _, masks = _head()
    plan = Plan(dataset="t", channels=["flair", "t2"], label_policy="mean", crop_margin=0)
    second = image * 2.0 + 7.0
    out, label, props = preprocess_volume([image, second], _affine_ras(), plan, masks)
    assert out.shape[1] == 2
    np.testing.assert_allclose(out[:, 0], out[:, 1], atol=1e-4)  # z-scoring removes scale and offset
    assert set(np.unique(label)) == {0.0, 0.5, 1.0}
    np.testing.assert_array_equal(restore(label, props), (masks[0].astype(np.float32) + masks[1]) / 2)
    assert len(props["norm"]) == 2


@pytest.mark.parametrize("slice_axis", [0, 1, 2])
def test_fg_slices(slice_axis):
    image, mask1, _ = _head()
    las_img, las_aff = _flip(image, _affine_ras(), 0)
    las_mask, _ = _flip(mask1, _affine_ras(), 0)
    plan = Plan(dataset="t", slice_axis=slice_axis, crop_margin=3)
    _, label, props = preprocess_volume([las_img], las_aff, plan, [las_mask])
    expected = [i for i in range(label.shape[0]) if label[i].any()]
    assert props["fg_slices"] == expected
    # independently: canonical (RAS) mask, cropped, lesion positions along the slice axis
    lo = props["crop_box"][slice_axis][0]
    along = sorted({int(c) - lo for c in np.argwhere(mask1)[:, slice_axis]})
    assert props["fg_slices"] == along


def test_no_masks_gives_no_label_and_no_fg_slices():
    image, _, _ = _head()
    out, label, props = preprocess_volume([image], _affine_ras(), Plan(dataset="t"))
    assert label is None and "fg_slices" not in props
    assert out.dtype == np.float32 and out.flags.c_contiguous


@pytest.mark.parametrize("fill", [0.0, -1.0])
def test_all_zero_or_negative_image_is_refused(fill):
    image = np.full(SHAPE, fill, np.float32)
    with pytest.raises(MslpipeError) as info:
        preprocess_volume([image], _affine_ras(), Plan(dataset="t"), where="scan_01.nii.gz")
    assert "scan_01.nii.gz" in str(info.value) and "empty" in str(info.value)


def test_scans_at_another_voxel_size_are_resampled_and_mapped_back():
    """A 2 mm scan is brought to the plan's 1 mm grid and the result mapped back to 2 mm exactly in shape."""
    from mslpipe import preprocess as P
    from mslpipe.plans import Plan

    rng = np.random.default_rng(1)
    img = np.zeros((20, 24, 16), np.float32)
    img[3:17, 4:20, 2:14] = 50 + rng.random((14, 16, 12)) * 10
    mask = np.zeros(img.shape, np.uint8)
    mask[8:12, 9:14, 6:10] = 1
    img[mask > 0] += 40
    affine = np.diag([-2.0, 2.0, 2.0, 1.0])
    plan = Plan("x", target_spacing=[1.0, 1.0, 1.0])
    image, label, props = P.preprocess_volume([img], affine, plan, [mask])
    assert props["resampled_shape"] == [40, 48, 32]
    assert image.shape[0] > 20  # slices at 1 mm
    back = P.restore((label >= 0.5).astype(np.uint8), props)
    assert back.shape == img.shape
    assert np.mean(back == mask) > 0.99
    prob = P.restore(label, props)
    assert prob.dtype == np.float32 and prob.shape == img.shape
    # at the planned voxel size nothing is interpolated
    _, label1, props1 = P.preprocess_volume([img], np.diag([-2.0, 2, 2, 1]), Plan("x", target_spacing=[2.0, 2, 2]),
                                            [mask])
    assert props1["resampled_shape"] is None
    assert np.array_equal(P.restore(label1.astype(np.uint8), props1), mask)


def test_a_voxel_size_stored_in_float32_gives_the_grid_its_exact_value_gives():
    """0.9 mm (a DICOM header's text) and 0.89999998 mm (the same size in a NIfTI header's float32): 155 voxels are
    139.5 mm, and both come onto one 1 mm grid (the float32 size rounded to 139 voxels, so a scan segmented
    differently as NIfTI and as DICOM)."""
    from mslpipe import preprocess as P

    img = np.zeros((155, 12, 10), np.float32)
    img[20:130, 3:9, 2:8] = 100 + np.random.default_rng(0).random((110, 6, 6))
    plan = Plan("x", target_spacing=[1.0, 1.0, 1.0], crop_margin=2)
    shapes = [P.preprocess_volume([img], np.diag([spacing, 1.0, 1.0, 1.0]), plan)[2]["resampled_shape"]
              for spacing in (0.9, float(np.float32(0.9)))]
    assert float(np.float32(0.9)) != 0.9 and shapes[0] == shapes[1] == [140, 12, 10]


def test_with_context_stacks_neighbours_in_order_and_repeats_edges():
    volume = np.arange(5 * 2 * 3 * 4, dtype=np.float32).reshape(5, 2, 3, 4)  # S=5 slices of C=2 channels
    np.testing.assert_array_equal(with_context(volume, np.array([1, 3]), 0), volume[[1, 3]])
    out = with_context(volume, np.array([0, 2, 4]), 1)
    assert out.shape == (3, 6, 3, 4)
    for row, s in enumerate((0, 2, 4)):
        expected = np.concatenate([volume[max(s - 1, 0)], volume[s], volume[min(s + 1, 4)]])
        np.testing.assert_array_equal(out[row], expected)
    assert with_context(volume, np.array([0]), 2).shape == (1, 10, 3, 4)


@pytest.mark.parametrize("context", [0, 1, 2])
def test_with_context_on_a_tensor_matches_the_array(context):
    import torch

    volume = np.random.default_rng(0).normal(size=(6, 2, 3, 4)).astype(np.float32)
    index = np.array([0, 3, 5])
    out = with_context(torch.from_numpy(volume), index, context)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_array_equal(out.numpy(), with_context(volume, index, context))
    memmap_like = np.lib.stride_tricks.as_strided(volume)  # an ndarray view: an ndarray comes back
    assert type(with_context(memmap_like, index, context)) is np.ndarray


@pytest.mark.parametrize("scale", [0.003, 7.5, 4096.0])
def test_network_input_ignores_the_scanners_intensity_scale(scale):
    """Scanners store FLAIR in arbitrary units: a rescaled scan gives the network the same input."""
    image, _, _ = _head(seed=3)
    plan = Plan(dataset="t", crop_margin=1)
    reference, _, props = preprocess_volume([image], _affine_ras(), plan)
    scaled, _, scaled_props = preprocess_volume([image * np.float32(scale)], _affine_ras(), plan)
    assert scaled_props["crop_box"] == props["crop_box"]
    np.testing.assert_allclose(scaled, reference, atol=1e-4)


def test_source_digest_of_a_vanished_file_names_it(tmp_path):
    from mslpipe.datasets import Case
    from mslpipe.preprocess import source_digest

    image = tmp_path / "a_flair.nii.gz"
    image.write_bytes(b"x")
    case = Case("a", "a", 1, {"flair": image}, [tmp_path / "gone_mask1.nii.gz"])
    with pytest.raises(MslpipeError) as info:
        source_digest(case)
    assert "gone_mask1.nii.gz" in str(info.value) and "cannot read" in str(info.value)
    image2 = tmp_path / "b_flair.nii.gz"
    image2.write_bytes(b"y")
    one, two = (source_digest(Case("a", "a", 1, {"flair": f}, [])) for f in (image, image2))
    assert one != two


def _scan_with_brain(shape=(60, 64, 48), brain=(20, 24, 16), spacing=1.0, head_margin=0):
    """A bright box of brain (plus, with ``head_margin``, a shell of 'scalp' around it, as a scan that was not
    skull-stripped) and its affine."""
    img = np.zeros(shape, np.float32)
    lo = [(n - b) // 2 for n, b in zip(shape, brain, strict=True)]
    if head_margin:
        img[tuple(slice(a - head_margin, a + b + head_margin) for a, b in zip(lo, brain, strict=True))] = 80
        inner = tuple(slice(a - head_margin + 4, a + b + head_margin - 4) for a, b in zip(lo, brain, strict=True))
        img[inner] = 0  # the skull: dark, inside the bright scalp (the mask's hole filling takes it in)
    img[tuple(slice(a, a + b) for a, b in zip(lo, brain, strict=True))] = 50 + np.random.default_rng(0).random(brain)
    return img, np.diag([-spacing, spacing, spacing, 1.0])


def test_brain_volume_warning_flags_heads_and_partial_scans_only():
    from mslpipe import preprocess as P

    img, affine = _scan_with_brain()
    brain_ml = 20 * 24 * 16 / 1000
    plan = Plan("x", target_spacing=[1.0, 1.0, 1.0], brain_ml_range=[0.9 * brain_ml, 1.1 * brain_ml])
    props = P.preprocess_volume([img], affine, plan)[2]
    assert P.brain_volume_ml(props, plan) == pytest.approx(brain_ml, rel=0.05)  # the opening trims the edges
    assert P.brain_volume_warning(props, plan) is None
    head = P.preprocess_volume([_scan_with_brain(head_margin=8)[0]], affine, plan)[2]
    assert "not skull-stripped" in P.brain_volume_warning(head, plan)
    part = img.copy()
    part[:, :, :26] = 0  # a slab: less than half of the brain's slices
    assert "part of the brain" in P.brain_volume_warning(P.preprocess_volume([part], affine, plan)[2], plan)
    assert P.brain_volume_warning(head, Plan("x", target_spacing=[1.0, 1.0, 1.0])) is None  # old plans: no check
    # resampled scans are measured on the planned grid (1 mm voxels, not the scan's 8 mm³): the same brain at 2 mm
    # has about the same volume (the interpolated rim of this small box adds some)
    coarse, coarse_affine = _scan_with_brain(shape=(30, 32, 24), brain=(10, 12, 8), spacing=2.0)
    coarse_props = P.preprocess_volume([coarse], coarse_affine, plan)[2]
    assert coarse_props["resampled_shape"] and P.brain_volume_ml(coarse_props, plan) == pytest.approx(brain_ml, 0.35)
    assert P.brain_volume_warning(coarse_props, plan) is None


def test_plan_refuses_a_bad_brain_volume_range():
    for bad in ([0, 10], [20, 10], [5], "big"):
        with pytest.raises(MslpipeError, match="brain_ml_range"):
            Plan("x", brain_ml_range=bad).validate()


def test_plan_refuses_an_unknown_normalisation():
    for bad in ({"scheme": "minmax", "lower_pct": 0.5, "upper_pct": 99.5},
                {"scheme": "brain_percentile_zscore", "lower_pct": 99.5, "upper_pct": 0.5}):
        with pytest.raises(MslpipeError, match="normalization"):
            Plan("x", normalization=bad).validate()


def test_flatfield_in_the_plan_preprocesses_and_hashes():
    """normalization.flatfield_mm: off when absent or 0 (same hashes, same arrays); set, it changes the arrays and
    both hashes; a negative or non-number value is refused."""
    image, _, _ = _head()
    plain = Plan("x", target_spacing=None)
    off = Plan("x", target_spacing=None, normalization={**plain.normalization, "flatfield_mm": 0})
    on = Plan("x", target_spacing=None, normalization={**plain.normalization, "flatfield_mm": 20})
    assert off.compute_hash() == plain.compute_hash() and off.preprocessing_hash() == plain.preprocessing_hash()
    assert on.compute_hash() != plain.compute_hash() and on.preprocessing_hash() != plain.preprocessing_hash()
    a = preprocess_volume([image], np.eye(4), plain)[0]
    assert np.array_equal(a, preprocess_volume([image], np.eye(4), off)[0])
    assert not np.allclose(a, preprocess_volume([image], np.eye(4), on)[0])
    for bad in (-5, "20", True, 1000):
        with pytest.raises(MslpipeError, match="flatfield_mm"):
            Plan("x", normalization={**plain.normalization, "flatfield_mm": bad}).validate()


def test_n4_in_the_plan_preprocesses_and_hashes():
    """normalization.n4_levels: off when absent or 0 (same hashes, same arrays); set, it changes the arrays and both
    hashes; a value that is not an integer from 0 to 6, or one beside a flat field, is refused."""
    image, _, _ = _head()
    image = image * np.linspace(0.7, 1.3, image.shape[0], dtype=np.float32)[:, None, None]
    plain = Plan("x", target_spacing=None)
    off = Plan("x", target_spacing=None, normalization={**plain.normalization, "n4_levels": 0})
    on = Plan("x", target_spacing=None, normalization={**plain.normalization, "n4_levels": 2})
    assert off.compute_hash() == plain.compute_hash() and off.preprocessing_hash() == plain.preprocessing_hash()
    assert on.compute_hash() != plain.compute_hash() and on.preprocessing_hash() != plain.preprocessing_hash()
    a = preprocess_volume([image], np.eye(4), plain)[0]
    assert np.array_equal(a, preprocess_volume([image], np.eye(4), off)[0])
    assert not np.allclose(a, preprocess_volume([image], np.eye(4), on)[0])
    for bad in (-1, 2.5, "3", True, 7):
        with pytest.raises(MslpipeError, match="n4_levels must be an integer"):
            Plan("x", normalization={**plain.normalization, "n4_levels": bad}).validate()
    with pytest.raises(MslpipeError, match="flatfield_mm or n4_levels, not both"):
        Plan("x", normalization={**plain.normalization, "n4_levels": 3, "flatfield_mm": 25}).validate()
    coarse = Plan("x", target_spacing=None, normalization={**on.normalization, "n4_grid_mm": 8})
    assert coarse.preprocessing_hash() != on.preprocessing_hash()
    assert not np.array_equal(preprocess_volume([image], np.eye(4), coarse)[0],
                              preprocess_volume([image], np.eye(4), on)[0])
    for bad in (0, 0.5, "6", True, 50):
        with pytest.raises(MslpipeError, match="n4_grid_mm must be a number of mm from 1 to 20"):
            Plan("x", normalization={**on.normalization, "n4_grid_mm": bad}).validate()


def test_a_failing_n4_names_the_scan(monkeypatch):
    """ITK's exception inside N4 becomes one line naming the scan and the way around it."""
    import mslpipe.preprocess as pre

    def broken(*args, **kwargs):
        raise RuntimeError("ITK ERROR: N4BiasFieldCorrectionImageFilter\n  Inputs do not occupy the same space")

    monkeypatch.setattr(pre, "correct_bias_n4", broken)
    image, _, _ = _head()
    plan = Plan("x", target_spacing=None, normalization={**Plan("x").normalization, "n4_levels": 3})
    with pytest.raises(MslpipeError, match=r"scan\.nii\.gz.*N4 bias-field correction failed \(Inputs do not occupy "
                       r"the same space\); a plan with --n4 0 skips it"):
        preprocess_volume([image], np.eye(4), plan, where="scan.nii.gz")


# ---------------------------------------------------------------------------- preprocess.run, several cases at once
def _run_plan(n4_levels: int = 0) -> Plan:
    plan = Plan(dataset="syn", target_spacing=None)
    plan.normalization = {**plan.normalization, "n4_levels": n4_levels}
    return plan


def _outputs(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("n4_levels", [0, 1])
def test_run_with_several_workers_writes_what_one_worker_writes(tmp_path, synth_root, n4_levels):
    from mslpipe import datasets, preprocess

    cases = datasets.discover(synth_root)[:4]
    plan = _run_plan(n4_levels)
    seen: list[str] = []
    one = preprocess.run(cases, plan, tmp_path / "one", workers=1)
    three = preprocess.run(cases, plan, tmp_path / "three", progress=seen.append, workers=3)
    assert one == three == [c.id for c in cases]
    assert sorted(seen) == sorted(c.id for c in cases)
    npy = {k: v for k, v in _outputs(tmp_path / "one").items() if k.endswith(".npy")}
    assert len(npy) == 8 and npy == {k: v for k, v in _outputs(tmp_path / "three").items() if k.endswith(".npy")}


def test_run_failing_cases_leave_the_others_whole_and_a_rerun_finishes(tmp_path, synth_root, monkeypatch):
    """Two of six cases fail: the error names the first of them in case order, whatever finished first; every case
    is either complete (arrays and properties) or absent; a rerun preprocesses exactly the absent ones."""
    from mslpipe import datasets, preprocess

    cases = datasets.discover(synth_root)[:6]
    bad = {cases[1].id, cases[4].id}
    real = preprocess.preprocess_volume

    def flaky(channels, affine, plan, masks=None, where=None):
        if any(b in str(where) for b in bad):
            if cases[1].id in str(where):
                time.sleep(0.5)  # the later bad case fails first
            raise MslpipeError(f"{where}: not a brain")
        return real(channels, affine, plan, masks, where=where)

    monkeypatch.setattr(preprocess, "preprocess_volume", flaky)
    out = tmp_path / "pre"
    with pytest.raises(MslpipeError, match=f"{cases[1].id}_flair_pp.*not a brain"):
        preprocess.run(cases, _run_plan(), out, workers=3)
    names = set(_outputs(out))
    done = {c.id for c in cases if f"{c.id}.json" in names}
    assert not done & bad
    for case in cases:
        whole = {f"{case.id}.json", f"{case.id}.npy", f"{case.id}_seg.npy"}
        assert whole <= names or not whole & names, case.id
    assert names == {f"{c}{suffix}" for c in done for suffix in (".json", ".npy", "_seg.npy")}  # no temporary files
    monkeypatch.setattr(preprocess, "preprocess_volume", real)
    again = preprocess.run(cases, _run_plan(), out, workers=3)
    assert again == [c.id for c in cases if c.id not in done]
    assert preprocess.run(cases, _run_plan(), out, workers=3) == []


def test_preprocess_workers_is_bounded_by_cases_and_cpus(monkeypatch):
    from mslpipe import preprocess

    monkeypatch.setattr(preprocess.os, "cpu_count", lambda: 16)
    assert [preprocess.preprocess_workers(n) for n in (1, 3, 20)] == [1, 3, 8]
    monkeypatch.setattr(preprocess.os, "cpu_count", lambda: None)
    assert preprocess.preprocess_workers(5) == 1
