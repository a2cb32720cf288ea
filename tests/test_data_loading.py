"""Tests for mslpipe.data_loading: reading preprocessed cases and the 2D training stream."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import pytest
import torch

from mslpipe import data_loading
from mslpipe.data_loading import (
    load_case_arrays,
    make_train_loader,
    open_case,
    resolve_num_workers,
)
from mslpipe.errors import MslpipeError
from mslpipe.io import save_npy, write_json
from mslpipe.plans import Augmentation, Plan

PATCH = 32
SPATIAL_ONLY = dict(p_rotate=1.0, p_scale=1.0, p_elastic=1.0, p_brightness=0.0, p_contrast=0.0,
                    p_gamma=0.0, p_noise=0.0, p_blur=0.0)
ALL_ON = dict(p_rotate=1.0, p_scale=1.0, p_elastic=1.0, p_brightness=1.0, p_contrast=1.0,
              p_gamma=1.0, p_noise=1.0, p_blur=1.0, p_low_res=1.0, p_bias_field=1.0)


def write_case(pre, name, image, seg):
    save_npy(pre / f"{name}.npy", image.astype(np.float32))
    save_npy(pre / f"{name}_seg.npy", seg.astype(np.float32))
    fg = [int(s) for s in np.nonzero(seg.reshape(seg.shape[0], -1).max(axis=1) > 0)[0]]
    write_json(pre / f"{name}.json", {"case": name, "fg_slices": fg})
    return name


def random_case(pre, name, rng, s=10, h=40, w=36, c=1, fg=(3,), box=((30, 34), (2, 6))):
    """Random non-zero image; lesion only on ``fg`` slices, in ``box`` (near a corner)."""
    image = rng.normal(size=(s, c, h, w)).astype(np.float32)
    image[image == 0] = 1.0
    seg = np.zeros((s, h, w), np.float32)
    (y0, y1), (x0, x1) = box
    for k in fg:
        seg[k, y0:y1, x0:x1] = 1.0
    return write_case(pre, name, image, seg)


def make_plan(channels=1, enabled=False, oversample=0.34, batch=6, **aug):
    return Plan(dataset="tiny", channels=[f"ch{i}" for i in range(channels)], patch_size=[PATCH, PATCH],
                batch_size=batch, oversample_foreground=oversample, num_workers=0,
                augmentation=Augmentation(enabled=enabled, **aug))


def locate(stored_image, patch_image):
    """Find (slice, y, x) in ``stored_image[:, 0]`` where the top-left non-zero value of a patch sits."""
    ys, xs = np.nonzero(patch_image[0])
    y, x = ys.min(), xs.min()
    hits = np.argwhere(stored_image[:, 0] == patch_image[0, y, x])
    assert len(hits) == 1
    s, sy, sx = hits[0]
    return int(s), int(sy) - int(y), int(sx) - int(x)


@pytest.fixture
def pre(tmp_path):
    d = tmp_path / "pre"
    d.mkdir()
    return d


# ---------------------------------------------------------------------------- reading
def test_open_case_gives_read_only_memmaps(pre):
    name = random_case(pre, "c1", np.random.default_rng(0))
    image, seg, props = open_case(pre, name)
    assert isinstance(image, np.memmap) and isinstance(seg, np.memmap)
    assert not image.flags.writeable and not seg.flags.writeable
    assert image.shape == (10, 1, 40, 36) and seg.shape == (10, 40, 36)
    assert props["fg_slices"] == [3] and props["case"] == "c1"
    full_image, full_seg, _ = load_case_arrays(pre, name)
    assert not isinstance(full_image, np.memmap) and full_image.dtype == np.float32
    np.testing.assert_array_equal(full_image, image)
    np.testing.assert_array_equal(full_seg, seg)


@pytest.mark.parametrize("victim", ["c1.npy", "c1_seg.npy", "c1.json"])
def test_missing_file_names_the_file(pre, victim):
    random_case(pre, "c1", np.random.default_rng(0))
    (pre / victim).unlink()
    for call in (lambda: open_case(pre, "c1"), lambda: load_case_arrays(pre, "c1"),
                 lambda: make_train_loader(pre, ["c1"], make_plan(), batches=1, seed=0)):
        with pytest.raises(MslpipeError, match=victim) as info:
            call()
        assert info.value.path.endswith(victim)
        # a case with no properties at all was never preprocessed: the message says how to finish that
        assert ("run it again: it preprocesses only what is missing" in str(info.value)) == (victim == "c1.json")


def test_corrupt_or_inconsistent_files_name_the_file(pre):
    random_case(pre, "c1", np.random.default_rng(0))
    (pre / "c1_seg.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(MslpipeError, match="c1_seg.npy"):
        open_case(pre, "c1")
    save_npy(pre / "c1_seg.npy", np.zeros((10, 39, 36), np.float32))
    with pytest.raises(MslpipeError, match="c1_seg.npy.*does not match"):
        open_case(pre, "c1")
    save_npy(pre / "c1_seg.npy", np.zeros((10, 40, 36), np.float32))
    write_json(pre / "c1.json", {"case": "c1", "fg_slices": [10]})
    with pytest.raises(MslpipeError, match="c1.json.*fg_slices"):
        open_case(pre, "c1")


def test_channel_mismatch_with_plan_is_refused(pre):
    random_case(pre, "c1", np.random.default_rng(0), c=2)
    with pytest.raises(MslpipeError, match="c1.npy.*2 channels"):
        make_train_loader(pre, ["c1"], make_plan(channels=1), batches=1, seed=0)


# ---------------------------------------------------------------------------- batches
@pytest.mark.parametrize("enabled", [False, True])
def test_batch_shapes_and_dtypes(pre, enabled):
    rng = np.random.default_rng(1)
    cases = [random_case(pre, "big", rng, c=2, h=40, w=36), random_case(pre, "small", rng, c=2, h=20, w=24)]
    loader = make_train_loader(pre, cases, make_plan(channels=2, enabled=enabled), batches=3, seed=0)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for b in batches:
        assert set(b) == {"image", "label"}
        assert b["image"].shape == (6, 2, PATCH, PATCH) and b["image"].dtype == torch.float32
        assert b["label"].shape == (6, 1, PATCH, PATCH) and b["label"].dtype == torch.float32
        assert torch.isfinite(b["image"]).all()


def test_small_case_is_zero_padded(pre):
    rng = np.random.default_rng(2)
    name = random_case(pre, "small", rng, h=20, w=24, box=((5, 9), (5, 9)))
    stored, stored_seg, _ = load_case_arrays(pre, name)
    for b in make_train_loader(pre, [name], make_plan(), batches=3, seed=3):
        for img, lab in zip(b["image"].numpy(), b["label"].numpy(), strict=True):
            ys, xs = np.nonzero(img[0])
            assert ys.max() - ys.min() + 1 == 20 and xs.max() - xs.min() + 1 == 24
            assert (img != 0).sum() == 20 * 24  # everything outside the case is padding
            y, x = ys.min(), xs.min()
            s, sy, sx = locate(stored, img)
            assert (sy, sx) == (-y, -x)  # the patch's first non-zero voxel is the case's corner
            np.testing.assert_array_equal(img[:, y:y + 20, x:x + 24], stored[s])
            np.testing.assert_array_equal(lab[0, y:y + 20, x:x + 24], stored_seg[s])
            assert lab.sum() == lab[0, y:y + 20, x:x + 24].sum()


def test_unaugmented_crop_is_exactly_the_stored_data(pre):
    rng = np.random.default_rng(4)
    name = random_case(pre, "big", rng, s=10, h=48, w=40, fg=(3, 7))
    stored, stored_seg, props = load_case_arrays(pre, name)
    n_fg = 3  # ceil(0.34 * 6)
    for b in make_train_loader(pre, [name], make_plan(), batches=5, seed=5):
        for i, (img, lab) in enumerate(zip(b["image"].numpy(), b["label"].numpy(), strict=True)):
            assert (img != 0).all()  # a crop, no padding
            s, y, x = locate(stored, img)
            np.testing.assert_array_equal(img, stored[s, :, y:y + PATCH, x:x + PATCH])
            np.testing.assert_array_equal(lab[0], stored_seg[s, y:y + PATCH, x:x + PATCH])
            if i < n_fg:
                assert s in props["fg_slices"] and lab.sum() > 0  # the crop holds lesion


def test_foreground_oversampling(pre):
    rng = np.random.default_rng(6)
    # lesion on 1 slice of 10, a 4x4 box near a corner of a 40x36 slice: random crops miss it
    cases = [random_case(pre, f"c{i}", rng, fg=(i + 2,)) for i in range(3)]
    counts = [int((b["label"].flatten(1).amax(1) > 0).sum())
              for b in make_train_loader(pre, cases, make_plan(oversample=0.34), batches=25, seed=0)]
    assert min(counts) >= 2
    counts = [int((b["label"].flatten(1).amax(1) > 0).sum())
              for b in make_train_loader(pre, cases, make_plan(oversample=0.0), batches=25, seed=0)]
    assert np.mean(counts) < 1.0  # without oversampling lesion is rare
    counts = [int((b["label"].flatten(1).amax(1) > 0.5).sum())
              for b in make_train_loader(pre, cases, make_plan(oversample=0.34, enabled=True), batches=25,
                                         seed=0)]
    assert np.mean(counts) >= 2.0  # with default augmentation lesion mostly survives


def test_lesion_slice_weights_weigh_every_lesion_the_same():
    seg = np.zeros((20, 12, 12), np.float32)
    seg[0:10, 2:6, 2:6] = 1.0   # a large lesion over slices 0-9
    seg[15, 8, 8] = 0.5         # a one-voxel lesion (one rater) on slice 15
    seg[4, 10, 10] = 1.0        # and another on slice 4, beside the large one
    fg = np.asarray([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 15])
    p = data_loading.lesion_slice_weights(seg, fg)
    assert p.sum() == pytest.approx(1.0)
    assert p[-1] == pytest.approx(1 / 3)  # slice 15: one of three lesions, all of its slices
    assert p[4] == pytest.approx(1 / 30 + 1 / 3)  # slice 4: a tenth of the large one, all of the small one
    assert p[0] == pytest.approx(1 / 30)
    # no lesion in the mask that fg_slices names: uniform rather than nothing to draw
    assert data_loading.lesion_slice_weights(np.zeros_like(seg), fg) == pytest.approx(np.full(11, 1 / 11))


def test_lesion_sampling_draws_small_lesions_as_often_as_large_ones(pre):
    """One case with a lesion over 9 slices and one on a single slice: foreground samples come from the single
    slice about 1 time in 10 when slices are drawn, about 1 in 2 when lesions are."""
    from mslpipe.data_loading import SliceSampler

    image = np.broadcast_to(np.arange(1, 13, dtype=np.float32)[:, None, None, None], (12, 1, 40, 36))  # slice + 1
    seg = np.zeros((12, 40, 36), np.float32)
    seg[0:9, 30:34, 2:6] = 1.0  # one lesion over slices 0-8
    seg[10, 10:12, 20:22] = 1.0  # another on slice 10 alone
    name = write_case(pre, "two", image, seg)
    shares = {}
    for mode in ("slice", "lesion"):
        plan = dataclasses.replace(make_plan(oversample=1.0, batch=50), foreground_sampling=mode)
        sampler = SliceSampler(pre, [name], plan, batches=8, seed=0)
        slices = np.concatenate([sampler.make_batch(0, i)["image"][:, 0, 0, 0].numpy() - 1 for i in range(8)])
        assert set(slices.astype(int)) <= set(range(9)) | {10}  # foreground samples only
        shares[mode] = float(np.mean(slices == 10))
    assert 0.03 < shares["slice"] < 0.2 and 0.4 < shares["lesion"] < 0.6, shares
    with pytest.raises(MslpipeError, match="foreground_sampling"):
        dataclasses.replace(make_plan(), foreground_sampling="voxel").validate()


def test_no_foreground_anywhere_still_works(pre, caplog):
    rng = np.random.default_rng(7)
    name = random_case(pre, "empty", rng, fg=())
    with caplog.at_level(logging.WARNING, logger="mslpipe.data_loading"):
        batches = list(make_train_loader(pre, [name], make_plan(), batches=2, seed=0))
    assert len(batches) == 2 and all(b["label"].sum() == 0 for b in batches)
    assert "no training case has lesion" in caplog.text


# ---------------------------------------------------------------------------- augmentation
def aligned_case(pre, rng):
    """Image equal to 5 x label, with big lesion squares (and some soft voxels) on every slice."""
    s, h, w = 10, 36, 36
    seg = np.zeros((s, h, w), np.float32)
    for k in range(s):
        y, x = rng.integers(4, 16, size=2)
        seg[k, y:y + 14, x:x + 12] = 1.0
        seg[k, y + 14, x:x + 12] = 0.5
    return write_case(pre, "aligned", seg[:, None] * 5.0, seg)


def test_spatial_augmentation_keeps_image_and_label_aligned(pre):
    name = aligned_case(pre, np.random.default_rng(8))
    plan = make_plan(enabled=True, **SPATIAL_ONLY)
    changed = agree = total = 0
    stored, _, _ = load_case_arrays(pre, name)
    for b in make_train_loader(pre, [name], plan, batches=6, seed=1):
        img, lab = b["image"][:, 0], b["label"][:, 0]
        assert lab.min() >= 0.0 and lab.max() <= 1.0
        assert ((lab > 0) & (lab < 1)).any()  # bilinear keeps labels soft
        fg = lab > 0.5
        agree += int((img[fg] > 2.5).sum())
        total += int(fg.sum())
        assert int(((img > 2.5) & ~fg).sum()) <= 0.05 * int((img > 2.5).sum())
        changed += int(not np.isin(img.numpy(), stored).all())
    assert total > 0 and agree >= 0.95 * total
    assert changed  # the transforms did move things


def test_all_augmentations_keep_labels_in_range(pre):
    rng = np.random.default_rng(9)
    cases = [random_case(pre, "c1", rng, fg=range(10), box=((10, 30), (8, 28)))]
    for b in make_train_loader(pre, cases, make_plan(enabled=True, **ALL_ON), batches=3, seed=2):
        assert b["label"].min() >= 0.0 and b["label"].max() <= 1.0
        assert torch.isfinite(b["image"]).all()


# ---------------------------------------------------------------------------- determinism, workers
def as_arrays(loader):
    return [(b["image"].numpy().copy(), b["label"].numpy().copy()) for b in loader]


def assert_same(a, b):
    assert len(a) == len(b)
    for (ia, la), (ib, lb) in zip(a, b, strict=True):
        np.testing.assert_array_equal(ia, ib)
        np.testing.assert_array_equal(la, lb)


def test_same_seed_same_batches_other_seed_different(pre):
    rng = np.random.default_rng(10)
    cases = [random_case(pre, f"c{i}", rng, fg=(1, 5), box=((10, 30), (8, 28))) for i in range(2)]
    plan = make_plan(enabled=True, **ALL_ON)
    first = make_train_loader(pre, cases, plan, batches=3, seed=11)
    second = make_train_loader(pre, cases, plan, batches=3, seed=11)
    epoch0, epoch1 = as_arrays(first), as_arrays(first)
    assert_same(epoch0, as_arrays(second))
    assert_same(epoch1, as_arrays(second))  # epochs differ from each other but replay exactly
    assert not np.array_equal(epoch0[0][0], epoch1[0][0])
    other = as_arrays(make_train_loader(pre, cases, plan, batches=3, seed=12))
    assert not np.array_equal(epoch0[0][0], other[0][0])
    resumed = as_arrays(make_train_loader(pre, cases, plan, batches=3, seed=11, start_epoch=1))
    assert_same(epoch1, resumed)


def test_two_workers_match_the_main_process(pre, monkeypatch):
    monkeypatch.setattr(data_loading, "_available_cpus", lambda: 4)
    rng = np.random.default_rng(13)
    cases = [random_case(pre, f"c{i}", rng, fg=(i,)) for i in range(3)]
    plan = make_plan(enabled=True)
    loader = make_train_loader(pre, cases, plan, batches=5, seed=3, num_workers=2)
    assert loader.num_workers == 2 and loader.persistent_workers
    epochs = [as_arrays(loader), as_arrays(loader)]
    reference = make_train_loader(pre, cases, plan, batches=5, seed=3, num_workers=0)
    for got in epochs:
        assert len(got) == 5
        assert_same(got, as_arrays(reference))


def test_resolve_num_workers(monkeypatch):
    plan = dataclasses.replace(make_plan(), num_workers=4)
    monkeypatch.setattr(data_loading, "_available_cpus", lambda: 2)
    assert resolve_num_workers(None, plan, batches=10) == 1
    assert resolve_num_workers(0, plan, batches=10) == 0
    monkeypatch.setattr(data_loading, "_available_cpus", lambda: 16)
    assert resolve_num_workers(None, plan, batches=10) == 4
    assert resolve_num_workers(8, plan, batches=3) == 3
    with pytest.raises(MslpipeError):
        resolve_num_workers(-1, plan, batches=3)


def test_subjects_weigh_equally_not_scans(tmp_path):
    """One subject with four scans and one with a single scan are drawn about equally often."""
    import json as _json

    from mslpipe.data_loading import SliceSampler
    from mslpipe.io import save_npy, write_json
    from mslpipe.plans import Augmentation, Plan

    cases = []
    for i, subject in enumerate(["many"] * 4 + ["one"]):
        case = f"{subject}_{i}"
        value = 1.0 if subject == "many" else 2.0
        save_npy(tmp_path / f"{case}.npy", np.full((4, 1, 8, 8), value, np.float32))
        save_npy(tmp_path / f"{case}_seg.npy", np.ones((4, 8, 8), np.float32))
        write_json(tmp_path / f"{case}.json", {"case": case, "subject": subject, "fg_slices": [0, 1, 2, 3]})
        cases.append(case)
    assert _json.loads((tmp_path / "one_4.json").read_text(encoding="utf-8"))["subject"] == "one"
    plan = Plan("x", patch_size=[8, 8], batch_size=50, oversample_foreground=0.5,
                augmentation=Augmentation(enabled=False))
    sampler = SliceSampler(tmp_path, cases, plan, batches=4, seed=0)
    values = np.concatenate([sampler.make_batch(0, i)["image"][:, 0, 0, 0].numpy() for i in range(4)])
    share_one = float(np.mean(values == 2.0))
    assert 0.35 < share_one < 0.65, share_one  # case-weighted sampling would give 0.2


@pytest.mark.parametrize("channels", [1, 2])
def test_context_slices_stack_the_neighbours(pre, channels):
    """2.5D: the middle channels are the 2D batch's slice, the others its neighbours in order (edges repeat)."""
    rng = np.random.default_rng(6)
    name = random_case(pre, "big", rng, s=10, h=48, w=40, c=channels, fg=(0, 9))  # lesions at both ends
    stored, _, _ = load_case_arrays(pre, name)
    flat = make_train_loader(pre, [name], make_plan(channels=channels), batches=3, seed=7)
    deep = make_train_loader(pre, [name], dataclasses.replace(make_plan(channels=channels), context_slices=1),
                             batches=3, seed=7)
    edges = 0
    for b2, b3 in zip(flat, deep, strict=True):
        assert b3["image"].shape == (6, 3 * channels, PATCH, PATCH)
        torch.testing.assert_close(b3["label"], b2["label"])
        for img2, img3 in zip(b2["image"].numpy(), b3["image"].numpy(), strict=True):
            np.testing.assert_array_equal(img3[channels:2 * channels], img2)  # same draws, same crop
            s, y, x = locate(stored, img2)
            for k, t in enumerate((max(s - 1, 0), s, min(s + 1, 9))):
                np.testing.assert_array_equal(img3[k * channels:(k + 1) * channels],
                                              stored[t, :, y:y + PATCH, x:x + PATCH])
            edges += s in (0, 9)
    assert edges  # the foreground slices at both ends were drawn: the clamped edge was exercised
