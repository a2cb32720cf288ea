"""`export-nnunet`: nnU-Net v2 raw layout, subject-level folds as splits_final.json, plans for leaky_unet."""

from __future__ import annotations

import copy
import json
import os
import pydoc
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mslpipe import nnunet_export
from mslpipe.datasets import discover
from mslpipe.errors import MslpipeError
from mslpipe.io import read_json

REPO = Path(__file__).resolve().parents[1]
NNUNET_PYTHON = REPO / "bench" / "nnunet" / ".venv" / "bin" / "python"

# The shape of an nnUNetPlans.json as nnunetv2 2.8's ExperimentPlanner writes it (values from a small dataset).
_PLAIN_ARCH = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 5, "features_per_stage": [32, 64, 128, 256, 512], "conv_op": "torch.nn.modules.conv.Conv2d",
        "kernel_sizes": [[3, 3]] * 5, "strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]],
        "n_conv_per_stage": [2] * 5, "n_conv_per_stage_decoder": [2] * 4, "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d", "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None, "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}
_RESAMPLING = {
    "resampling_fn_data": "resample_data_or_seg_to_shape", "resampling_fn_seg": "resample_data_or_seg_to_shape",
    "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
    "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
    "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
    "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0, "force_separate_z": None},
}
NNUNET_PLANS = {
    "dataset_name": "Dataset501_syn",
    "plans_name": "nnUNetPlans",
    "original_median_spacing_after_transp": [1.0, 1.0, 1.0],
    "original_median_shape_after_transp": [32, 40, 44],
    "image_reader_writer": "SimpleITKIO",
    "transpose_forward": [0, 1, 2],
    "transpose_backward": [0, 1, 2],
    "configurations": {
        "2d": {
            "data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor", "batch_size": 12,
            "patch_size": [64, 48], "median_image_size_in_voxels": [40.0, 44.0], "spacing": [1.0, 1.0],
            "normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [True], **_RESAMPLING,
            "architecture": _PLAIN_ARCH, "batch_dice": True,
        },
        "3d_fullres": {
            "data_identifier": "nnUNetPlans_3d_fullres", "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2, "patch_size": [32, 48, 48], "median_image_size_in_voxels": [32.0, 40.0, 44.0],
            "spacing": [1.0, 1.0, 1.0], "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [True], **_RESAMPLING, "batch_dice": False,
            "architecture": {**_PLAIN_ARCH, "arch_kwargs": {**_PLAIN_ARCH["arch_kwargs"],
                                                            "conv_op": "torch.nn.modules.conv.Conv3d"}},
        },
    },
    "experiment_planner_used": "ExperimentPlanner",
    "label_manager": "LabelManager",
    "foreground_intensity_properties_per_channel": {
        "0": {"max": 3.0, "mean": 1.0, "median": 1.0, "min": 0.0, "percentile_00_5": 0.1,
              "percentile_99_5": 2.9, "std": 0.5},
    },
}


@pytest.fixture(scope="module")
def exported(planned, tmp_path_factory):
    d, result = planned
    out = tmp_path_factory.mktemp("nnunet") / "Dataset501_syn"
    written = nnunet_export.run("syn", d, out, plans=True, preprocessed_dir=out.parent / "pre" / out.name)
    return out, written, result


def _subject(fingerprint: dict) -> dict[str, str]:
    return {c["case"]: c["subject"] for c in fingerprint["cases"]}


def test_layout_and_dataset_json(exported):
    out, written, result = exported
    fp, splits = result["fingerprint"], result["splits"]
    test_subjects = set(splits["test"])
    train = sorted(c["case"] for c in fp["cases"] if not c["test_only"] and c["subject"] not in test_subjects)
    test = sorted(c["case"] for c in fp["cases"] if c["test_only"] or c["subject"] in test_subjects)
    assert test and train and written["training"] == train and written["test"] == test
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == [f"{c}_0000.nii.gz" for c in train]
    assert sorted(p.name for p in (out / "labelsTr").iterdir()) == [f"{c}.nii.gz" for c in train]
    assert sorted(p.name for p in (out / "imagesTs").iterdir()) == [f"{c}_0000.nii.gz" for c in test]
    meta = read_json(out / "dataset.json")
    assert meta["channel_names"] == {"0": "FLAIR"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == len(train) and meta["file_ending"] == ".nii.gz"
    assert read_json(out / "subjects.json") == _subject(fp)
    assert not list(out.rglob(".*.tmp*"))  # atomic writes leave no temporary files


def test_images_are_copies_and_labels_binary_integer(exported):
    out, written, result = exported
    cases = {c.id: c for c in discover(result["fingerprint"]["source"])}
    for cid in written["training"]:
        src = cases[cid].images["flair"]
        assert (out / "imagesTr" / f"{cid}_0000.nii.gz").read_bytes() == src.read_bytes()
        label = nib.load(out / "labelsTr" / f"{cid}.nii.gz")
        data = np.asanyarray(label.dataobj)
        assert data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1}
        image = nib.load(src)
        assert data.shape == image.shape and np.allclose(label.affine, image.affine)
        assert label.header["qform_code"] == image.header["qform_code"]
        assert label.header["sform_code"] == image.header["sform_code"]
        masks = [np.asanyarray(nib.load(m).dataobj) > 0 for m in cases[cid].masks]
        assert len(masks) == 2  # plan policy "mean" → at least half of the raters: the union of two
        np.testing.assert_array_equal(data, np.logical_or(*masks))


def test_splits_final_are_mslpipe_folds_by_subject(exported):
    out, written, result = exported
    fp, splits = result["fingerprint"], result["splits"]
    subject = _subject(fp)
    folds = read_json(out / "splits_final.json")
    assert folds == read_json(out.parent / "pre" / out.name / "splits_final.json")
    assert isinstance(folds, list) and len(folds) == len(splits["folds"])
    for nn_fold, ms_fold in zip(folds, splits["folds"], strict=True):
        assert set(nn_fold) == {"train", "val"}
        assert {subject[c] for c in nn_fold["train"]} == set(ms_fold["train"])
        assert {subject[c] for c in nn_fold["val"]} == set(ms_fold["val"])
        assert not set(nn_fold["train"]) & set(nn_fold["val"])
        assert set(nn_fold["train"]) | set(nn_fold["val"]) == set(written["training"])
        for part in ("train", "val"):  # every scan of a subject in the same partition
            subjects = {subject[c] for c in nn_fold[part]}
            assert sorted(nn_fold[part]) == sorted(c for c in written["training"] if subject[c] in subjects)


def test_export_reads_back_with_subjects(exported):
    out, written, result = exported
    cases = discover(out)
    subject = _subject(result["fingerprint"])
    assert {c.id for c in cases} == set(written["training"]) | set(written["test"])
    for case in cases:
        assert case.subject == subject[case.id]
        assert case.test_only == (case.id in written["test"])
        assert [m.name for m in case.masks] == [f"{case.id}.nii.gz"]  # test cases: their labelsTs masks
        assert case.masks[0].parent.name == ("labelsTs" if case.test_only else "labelsTr")


def test_nii_sources_are_reencoded_with_their_header(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6)
    affine = np.diag([-0.9, 1.1, 1.3, 1.0])
    affine[:3, 3] = [10, -20, 5]
    img = nib.Nifti1Image(data, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=2)
    nib.save(img, tmp_path / "a.nii")
    nnunet_export._copy_image(tmp_path / "a.nii", tmp_path / "out" / "a_0000.nii.gz")
    back = nib.load(tmp_path / "out" / "a_0000.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), data)
    assert back.get_data_dtype() == np.int16 and np.allclose(back.affine, affine)
    assert int(back.header["qform_code"]) == 1 and int(back.header["sform_code"]) == 2


def test_binary_label_policies():
    a = np.array([1, 1, 0, 0], np.uint8)
    b = np.array([1, 0, 1, 0], np.uint8)
    assert nnunet_export.binary_label([a, b], "mask1").tolist() == [1, 1, 0, 0]
    assert nnunet_export.binary_label([a, b], "union").tolist() == [1, 1, 1, 0]
    assert nnunet_export.binary_label([a, b], "intersection").tolist() == [1, 0, 0, 0]
    assert nnunet_export.binary_label([a, b], "mean").tolist() == [1, 1, 1, 0]
    c = np.array([0, 1, 0, 0], np.uint8)
    assert nnunet_export.binary_label([a, b, c], "mean").tolist() == [1, 1, 0, 0]  # 2 of 3 raters
    assert nnunet_export.binary_label([b], "intersection").dtype == np.uint8
    with pytest.raises(MslpipeError):
        nnunet_export.binary_label([a], "majority")


# ---------------------------------------------------------------------------- plans
def _build_like_nnunet(arch: dict, deep_supervision: bool):
    """nnunetv2's get_network_from_plans, re-implemented: locate the class, call it with nnU-Net's keywords."""
    kwargs = dict(arch["arch_kwargs"])
    for key in arch["_kw_requires_import"]:
        if kwargs[key] is not None:
            kwargs[key] = pydoc.locate(kwargs[key])
    cls = pydoc.locate(arch["network_class_name"])
    assert cls is not None, arch["network_class_name"]
    return cls(input_channels=1, num_classes=2, deep_supervision=deep_supervision, **kwargs)


def test_patch_plans_builds_leaky_unet():
    arch_kwargs = {"base_channels": 4, "max_channels": 32, "depth": 3}
    original = copy.deepcopy(NNUNET_PLANS)
    patched = nnunet_export.patch_plans(NNUNET_PLANS, arch_kwargs)
    assert NNUNET_PLANS == original  # the input is not changed
    assert patched["plans_name"] == "nnUNetPlans_leaky_unet"
    conf = patched["configurations"]["2d"]
    assert {k: v for k, v in conf.items() if k != "architecture"} == \
        {k: v for k, v in NNUNET_PLANS["configurations"]["2d"].items() if k != "architecture"}
    assert patched["configurations"]["3d_fullres"] == NNUNET_PLANS["configurations"]["3d_fullres"]
    arch = conf["architecture"]
    assert set(arch) == {"network_class_name", "arch_kwargs", "_kw_requires_import"}
    assert arch["network_class_name"] == "mslpipe.architectures.nnunet_adapter.NnUNetLeakyUNet"
    assert arch["_kw_requires_import"] == []
    assert arch["arch_kwargs"] == {**arch_kwargs, "strides": [[1, 1], [2, 2], [2, 2], [2, 2]]}
    json.dumps(patched)  # JSON-serialisable as it is

    net = _build_like_nnunet(arch, deep_supervision=False).eval()
    x = torch.randn(3, 1, *conf["patch_size"])
    with torch.no_grad():
        assert net(x).shape == (3, 2, *conf["patch_size"])
    net.decoder.deep_supervision = True  # what nnU-Net's trainer does
    scales = 1 / np.cumprod(np.vstack(arch["arch_kwargs"]["strides"]), axis=0)[:-1]  # the trainer's DS scales
    with torch.no_grad():
        outputs = net(x)
    assert [tuple(o.shape) for o in outputs] == [(3, 2, *(int(p * s) for p, s in zip(conf["patch_size"], sc,
                                                                                      strict=True)))
                                                 for sc in scales]


def test_deep_supervision_off_is_leaky_unet():
    from mslpipe.architectures import LeakyUNet

    kwargs = {"base_channels": 4, "max_channels": 16, "depth": 2}
    torch.manual_seed(0)
    nn_net = _build_like_nnunet(nnunet_export.leaky_unet_architecture(kwargs), deep_supervision=True)
    plain = LeakyUNet(1, 2, **kwargs)
    missing, unexpected = plain.load_state_dict(nn_net.state_dict(), strict=False)
    assert not missing and all(k.startswith("ds_heads.") for k in unexpected)
    nn_net.decoder.deep_supervision = False
    x = torch.randn(2, 1, 16, 12)
    with torch.no_grad():
        torch.testing.assert_close(nn_net.eval()(x), plain.eval()(x))


def test_patch_plans_refuses_what_cannot_work(tmp_path):
    with pytest.raises(MslpipeError, match="divisible by 32"):
        nnunet_export.patch_plans(NNUNET_PLANS, {"depth": 5})  # 48 is not a multiple of 32
    with pytest.raises(MslpipeError, match="2D only"):
        nnunet_export.patch_plans(NNUNET_PLANS, configuration="3d_fullres")
    with pytest.raises(MslpipeError, match="configuration"):
        nnunet_export.patch_plans({"configurations": {}})
    with pytest.raises(MslpipeError, match="strides"):
        nnunet_export.leaky_unet_architecture({"strides": [[1, 1]]})
    from mslpipe.architectures.nnunet_adapter import NnUNetLeakyUNet

    with pytest.raises(ValueError, match="strides"):
        NnUNetLeakyUNet(input_channels=1, num_classes=2, depth=2, strides=[[1, 1], [2, 2]])


def test_write_patched_plans_beside_the_input(tmp_path):
    src = tmp_path / "nnUNetPlans.json"
    src.write_text(json.dumps(NNUNET_PLANS))
    path = nnunet_export.write_patched_plans(src, {"depth": 3})
    assert path == tmp_path / "nnUNetPlans_leaky_unet.json"
    assert read_json(path)["configurations"]["2d"]["architecture"]["arch_kwargs"]["depth"] == 3
    assert read_json(src) == NNUNET_PLANS
    with pytest.raises(MslpipeError, match="overwrite"):
        nnunet_export.write_patched_plans(path, {"depth": 3})
    # a plans file that cannot be patched is named in the error (patch_plans itself sees only a dict)
    other = tmp_path / "other" / "nnUNetPlans.json"
    other.parent.mkdir()
    other.write_text(json.dumps({"configurations": {}}))
    with pytest.raises(MslpipeError, match="configuration") as info:
        nnunet_export.write_patched_plans(other, {"depth": 3})
    assert info.value.path == str(other) and not (other.parent / "nnUNetPlans_leaky_unet.json").exists()


def test_fragment_names_the_plans_arch_kwargs(exported, planned):
    out, written, _ = exported
    plan = json.loads((planned[0].plan_dir("syn") / "plans.json").read_text())
    fragment = read_json(written["fragment"])
    arch = fragment["configurations"]["2d"]["architecture"]
    assert arch == nnunet_export.leaky_unet_architecture(plan["arch_kwargs"])


@pytest.mark.skipif(not NNUNET_PYTHON.exists(), reason="nnU-Net not set up (bash bench/nnunet/setup.sh)")
def test_real_nnunet_builds_and_trains_leaky_unet(tmp_path):
    """nnU-Net's own builder, deep-supervision switch, loss and predictor-style reload, in its own venv."""
    plans = tmp_path / "nnUNetPlans.json"
    plans.write_text(json.dumps(NNUNET_PLANS))
    patched = nnunet_export.write_patched_plans(plans, {"base_channels": 4, "max_channels": 32, "depth": 3})
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(NNUNET_PYTHON), str(REPO / "bench" / "nnunet" / "check_builder.py"), str(patched)],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, cwd=tmp_path,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["class"] == nnunet_export.NETWORK_CLASS
    assert report["inference_output"] == [2, 2, 64, 48]
    assert report["deep_supervision_outputs"] == [[2, 2, 64, 48], [2, 2, 32, 24], [2, 2, 16, 12]]


def test_cli_export_nnunet(planned, tmp_path):
    d, _ = planned
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plans = tmp_path / "pre" / "nnUNetPlans.json"
    plans.parent.mkdir()
    plans.write_text(json.dumps(NNUNET_PLANS))
    out = subprocess.run([sys.executable, "-m", "mslpipe", "--plans", str(d.plans), "export-nnunet", "-d", "syn",
                          "-o", str(tmp_path / "ds"), "--nnunet-plans", str(plans), "--label-policy", "mask1"],
                         capture_output=True, text=True, encoding="utf-8", errors="replace", env=env)
    assert out.returncode == 0, out.stderr
    assert "nnUNetPlans_leaky_unet" in out.stdout
    assert (tmp_path / "pre" / "nnUNetPlans_leaky_unet.json").exists()
    assert "mask1" in read_json(tmp_path / "ds" / "dataset.json")["description"]
