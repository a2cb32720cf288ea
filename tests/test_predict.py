"""Prediction: output geometry, NIfTI and DICOM inputs, bad files, reruns, TTA and ensembles."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

from mslpipe import datasets, inference, predict
from mslpipe.dicom import load_dicom_series, write_dicom_series
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, save_nifti


@pytest.fixture(scope="module")
def model(trained):
    d, result = trained
    return result["fold_dir"] / "checkpoint_final.pt"


@pytest.fixture
def scan(synth_root):
    path = next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz"))
    return load_image(path)


def _oblique_affine() -> np.ndarray:
    """Permuted and flipped axes, anisotropic voxels, an offset: nothing canonical about it."""
    return np.array([[0.0, 0.0, -1.2, 40.0], [-1.0, 0.0, 0.0, 12.0], [0.0, 0.9, 0.0, -7.0], [0, 0, 0, 1]])


def test_output_geometry_nii_and_nii_gz(model, scan, tmp_path):
    data, _ = scan
    affine = _oblique_affine()
    inp = tmp_path / "in"
    save_nifti(inp / "scan_a.nii", data, affine, dtype=np.float32)
    save_nifti(inp / "scan_b.nii.gz", data, affine, dtype=np.float32)
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert sorted(report.written) == ["scan_a", "scan_b"] and not report.failed
    import nibabel as nib

    for name in ("scan_a", "scan_b"):
        out = nib.load(str(tmp_path / "out" / f"{name}.nii.gz"))
        assert out.shape == data.shape
        assert np.allclose(out.affine, affine, atol=1e-5)
        assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
        arr = np.asarray(out.dataobj)
        assert arr.dtype == np.uint8 and set(np.unique(arr)) <= {0, 1}


def test_orientation_does_not_change_the_segmentation(model, scan, tmp_path):
    """The same scan stored with flipped voxel axes gives the same mask in world space."""
    data, affine = scan
    flipped = data[::-1, :, ::-1].copy()
    aff2 = affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, -1, data.shape[2] - 1],
                              [0, 0, 0, 1]])
    predictor = inference.load_predictor([model], device="cpu")
    m1, _ = inference.predict_case(predictor, [data], affine)
    m2, _ = inference.predict_case(predictor, [flipped], aff2)
    assert np.array_equal(m1, m2[::-1, :, ::-1])



@pytest.fixture(scope="module")
def sagittal(tmp_path_factory, synth_root):
    """The synthetic data planned to be sliced sagittally (``plan --slice-axis 0``), fold 0 trained briefly."""
    from conftest import TINY_OVERRIDES

    from mslpipe import plan, train
    from mslpipe.plans import Workdirs

    base = tmp_path_factory.mktemp("sagittal")
    d = Workdirs.resolve(base / "raw", base / "plans", base / "pre", base / "results")
    plan.run("syn", d, input_path=synth_root, device="cpu", slice_axis=0,
             overrides={**TINY_OVERRIDES, "normalization.n4_levels": 0})
    result = train.run("syn", d, 0, epochs=1, iterations=2, device="cpu", show_progress=False)
    return d, result["fold_dir"] / "checkpoint_final.pt"


def test_a_sagittal_model_segments_on_the_scans_own_grid(sagittal, scan, tmp_path):
    """A model sliced along another axis: predict's probabilities on the scan's grid are the network's on the
    plan's preprocessed (sagittal) slices mapped back; flipped storage gives the same mask; geometry kept."""
    from mslpipe import data_loading
    from mslpipe.preprocess import restore

    d, checkpoint = sagittal
    predictor = inference.load_predictor([checkpoint], device="cpu")
    assert predictor.plan.slice_axis == 0
    data, affine = scan
    mask, prob = inference.predict_case(predictor, [data], affine)
    image, _, props = data_loading.load_case_arrays(d.preprocessed_dir("syn"), "training01_01")
    assert props["slice_axis"] == 0 and image.shape[0] == props["crop_box"][0][1] - props["crop_box"][0][0]
    np.testing.assert_allclose(prob, restore(predictor.run_volume(image), props), atol=1e-5)
    flipped = data[::-1, :, ::-1].copy()
    aff2 = affine @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, -1, data.shape[2] - 1],
                              [0, 0, 0, 1]])
    assert np.array_equal(mask, inference.predict_case(predictor, [flipped], aff2)[0][::-1, :, ::-1])
    inp = tmp_path / "in"
    save_nifti(inp / "scan.nii.gz", data, _oblique_affine(), dtype=np.float32)
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[checkpoint], device="cpu")
    out, out_affine = load_image(tmp_path / "out" / "scan.nii.gz")
    assert report.written == ["scan"] and out.shape == data.shape
    assert np.allclose(out_affine, _oblique_affine(), atol=1e-5)

def test_dicom_series_input(model, scan, tmp_path):
    data, affine = scan
    write_dicom_series(tmp_path / "dicom" / "patientA_flair", np.round(data), affine)
    report = predict.run(tmp_path / "dicom", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert report.written == ["patientA_flair"] and not report.failed
    out, out_aff = load_image(tmp_path / "out" / "patientA_flair.nii.gz")
    dicom, dicom_aff = load_dicom_series(tmp_path / "dicom" / "patientA_flair")
    # DICOM stacks a left-handed grid in the other slice order: same world space, own voxel grid
    assert out.shape == dicom.shape and np.allclose(out_aff, dicom_aff, atol=1e-5)
    assert np.allclose(np.abs(np.linalg.det(out_aff)), np.abs(np.linalg.det(affine)), atol=1e-4)


def test_bad_file_is_reported_and_the_rest_goes_on(model, scan, tmp_path):
    data, affine = scan
    inp = tmp_path / "in"
    save_nifti(inp / "good.nii.gz", data, affine, dtype=np.float32)
    (inp / "broken.nii.gz").write_bytes(b"\x1f\x8b\x08 this is not a NIfTI file")
    bad = data.copy()
    bad[3, 3, 3] = np.nan
    save_nifti(inp / "nan.nii.gz", bad, affine, dtype=np.float32)
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert report.written == ["good"]
    failed = dict(report.failed)
    assert set(failed) == {"broken", "nan"}
    assert "broken.nii.gz" in failed["broken"] and "NIfTI" in failed["broken"]
    assert "NaN" in failed["nan"]
    assert not list((tmp_path / "out").glob(".*tmp*")), "temporary files left behind"


@pytest.mark.parametrize("overwrite", [False, True])
def test_the_input_folder_as_output_is_refused_and_the_scans_are_untouched(model, scan, tmp_path, overwrite):
    """-o naming the folder the scans come from (given as the folder, or as a file in it): with --overwrite the mask
    would replace the scan of the same name, without it the scan would pass for a finished output and be skipped."""
    data, affine = scan
    inp = tmp_path / "scans"
    path = save_nifti(inp / "single.nii.gz", data, affine, dtype=np.float32)
    before = path.read_bytes()
    for given in (inp, path, tmp_path / "scans" / "."):
        with pytest.raises(MslpipeError, match="the output folder is the folder the scans are read from") as info:
            predict.run(given, inp, dirs=None, checkpoint=[model], device="cpu", overwrite=overwrite)
        assert info.value.path == str(inp)
    assert path.read_bytes() == before and sorted(p.name for p in inp.iterdir()) == ["single.nii.gz"]


def test_two_inputs_with_one_output_name_are_refused_before_any_work(model, scan, tmp_path):
    """scan.nii and scan.nii.gz would both write OUT/scan.nii.gz: refused naming both inputs and the output, nothing
    written."""
    data, affine = scan
    inp = tmp_path / "in"
    save_nifti(inp / "scan.nii", data, affine, dtype=np.float32)
    save_nifti(inp / "scan.nii.gz", data, affine, dtype=np.float32)
    with pytest.raises(MslpipeError, match=r"would all write scan.nii.gz here: rename or move all but one") as info:
        predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert str(inp / "scan.nii") in str(info.value) and str(inp / "scan.nii.gz") in str(info.value)
    assert info.value.path == str(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_channel_on_another_grid_is_refused_naming_it(scan, tmp_path):
    """A two-channel scan whose second channel has another shape, or the same shape placed elsewhere."""
    data, affine = scan
    first = save_nifti(tmp_path / "a_0000.nii.gz", data, affine, dtype=np.float32)
    moved = affine.copy()
    moved[:3, 3] += 5.0
    for name, second in (("short", (data[:-1], affine)), ("moved", (data, moved))):
        other = save_nifti(tmp_path / f"{name}_0001.nii.gz", second[0], second[1], dtype=np.float32)
        with pytest.raises(MslpipeError, match="not on the same grid") as info:
            datasets.Source("a", [first, other]).read()
        assert str(other) in str(info.value)


def test_rerun_skips_finished_cases_unless_overwrite(model, scan, tmp_path):
    data, affine = scan
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    first = predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert first.written == ["a"]
    mtime = (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns
    again = predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert again.skipped == ["a"] and not again.written
    assert (tmp_path / "out" / "a.nii.gz").stat().st_mtime_ns == mtime
    forced = predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu",
                         overwrite=True)
    assert forced.written == ["a"]


def test_tta_ensemble_and_probabilities(model, scan, tmp_path):
    data, affine = scan
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    report = predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model, model], device="cpu",
                         tta=True, save_probabilities=True)
    assert report.written == ["a"]
    prob, _ = load_image(tmp_path / "out" / "probabilities" / "a.nii.gz")
    mask, _ = load_image(tmp_path / "out" / "a.nii.gz")
    assert prob.shape == data.shape and 0 <= prob.min() and prob.max() <= 1
    assert np.array_equal(mask > 0, prob >= 0.5)


def test_dataset_folder_predicts_its_test_split(trained, planned, synth_root, tmp_path):
    d, _ = trained
    splits = planned[1]["splits"]
    report = predict.run(synth_root, tmp_path / "out", dirs=d, dataset="syn", device="cpu")
    assert report.written and {c.split("_")[0] for c in report.written} == set(splits["test"])


def test_missing_input_and_missing_model(model, tmp_path, dirs):
    with pytest.raises(MslpipeError, match="input not found"):
        predict.run(tmp_path / "nope", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    with pytest.raises(MslpipeError, match="input not found"):  # said first, before any model is looked at
        predict.run(tmp_path / "nope", tmp_path / "out", dirs=None, checkpoint=[tmp_path / "x.pt"], device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MslpipeError, match="no NIfTI files"):
        predict.run(tmp_path / "empty", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    with pytest.raises(MslpipeError, match="checkpoint not found"):
        predict.run(tmp_path, tmp_path / "out", dirs=None, checkpoint=[tmp_path / "x.pt"], device="cpu")
    with pytest.raises(MslpipeError, match="-d NAME"):
        predict.run(tmp_path, tmp_path / "out", dirs=dirs, device="cpu")


def test_with_a_dataset_the_scans_are_found_before_the_models_load(trained, tmp_path, monkeypatch):
    d, _ = trained
    (tmp_path / "empty").mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before the input was looked at")

    monkeypatch.setattr(inference, "load_predictor", no_loading)
    with pytest.raises(MslpipeError, match="no NIfTI files"):
        predict.run(tmp_path / "empty", tmp_path / "out", dirs=d, dataset="syn", device="cpu")


def test_with_a_checkpoint_the_scans_and_the_files_are_checked_before_the_models_load(model, tmp_path, monkeypatch):
    """A checkpoint whose training run left plan.json beside it: an empty input folder, or a second checkpoint that
    is missing, is said without loading any model; without that plan the models load first, as before."""

    (tmp_path / "empty").mkdir()

    def no_loading(*args, **kwargs):
        raise AssertionError("models loaded before the input was looked at")

    assert (model.parent / "plan.json").exists()
    monkeypatch.setattr(inference, "load_predictor", no_loading)
    with pytest.raises(MslpipeError, match="no NIfTI files"):
        predict.run(tmp_path / "empty", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    with pytest.raises(MslpipeError, match="checkpoint not found") as info:
        predict.run(tmp_path / "empty", tmp_path / "out", dirs=None, checkpoint=[model, tmp_path / "y.pt"],
                    device="cpu")
    assert "y.pt" in str(info.value)
    alone = tmp_path / "alone" / "w.pt"
    alone.parent.mkdir()
    shutil.copy(model, alone)
    with pytest.raises(AssertionError, match="models loaded"):
        predict.run(tmp_path / "empty", tmp_path / "out", dirs=None, checkpoint=[alone], device="cpu")


def test_unsafe_output_names_are_refused(model, scan, tmp_path):
    data, affine = scan
    inp = tmp_path / "in"
    save_nifti(inp / "evil..x.nii.gz", data, affine, dtype=np.float32)
    with pytest.raises(MslpipeError, match="unsafe case name"):
        predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")


def test_read_only_output_folder_fails_cleanly(model, scan, tmp_path):
    import os

    data, affine = scan
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    out = tmp_path / "out"
    out.mkdir()
    out.chmod(0o555)
    try:
        if os.access(out, os.W_OK):
            pytest.skip("running with permissions that ignore a read-only folder")
        report = predict.run(tmp_path / "in", out, dirs=None, checkpoint=[model], device="cpu")
        assert not report.written and report.failed and "cannot write" in report.failed[0][1]
    finally:
        out.chmod(0o755)
        shutil.rmtree(out)


def test_cpu_inference_caps_a_gpu_plans_batch():
    """A GPU plan's inference batch (hundreds of slices) goes through a CPU in chunks of CPU_INFERENCE_BATCH."""
    import torch

    from mslpipe.plans import CPU_INFERENCE_BATCH

    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(x.shape[0])
            return x[:, :1] * 2.0

    image = np.random.default_rng(0).normal(size=(40, 1, 8, 8)).astype(np.float32)
    logits = inference.predict_volume([Probe()], image, divisor=8, device="cpu", batch_size=256, return_logits=True)
    assert max(seen) == CPU_INFERENCE_BATCH and sum(seen) == 40
    np.testing.assert_allclose(logits, image[:, 0] * 2.0, rtol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_context_slices_reach_the_network_in_order(batch_size):
    """With context 1 the network sees (previous, this, next) slice as channels, at every batch boundary."""
    import torch

    class Previous(torch.nn.Module):
        def forward(self, x):
            assert x.shape[1] == 3
            return x[:, :1]

    image = np.random.default_rng(1).normal(size=(7, 1, 8, 8)).astype(np.float32)
    logits = inference.predict_volume([Previous()], image, divisor=8, device="cpu", batch_size=batch_size,
                                      return_logits=True, context=1)
    np.testing.assert_array_equal(logits, image[[0, 0, 1, 2, 3, 4, 5], 0])


def test_loaded_model_matches_the_checkpoint(model):
    """Networks are built without initialisation and filled from the checkpoint: no tensor is left unset, and
    the outputs are those of the network the weights came from."""
    import torch

    from mslpipe import architectures, checkpoints
    from mslpipe.plans import Plan

    payload = checkpoints.load(model)
    plan = Plan.from_dict(payload["meta"]["plan"])
    reference = architectures.build(plan.architecture, in_channels=plan.input_channels, **plan.arch_kwargs)
    reference.load_state_dict(payload["model"])
    reference.eval()
    loaded = inference.load_predictor([model], device="cpu").models[0]
    tensors = list(loaded.parameters()) + list(loaded.buffers())
    assert tensors and not any(t.is_meta for t in tensors)
    x = torch.randn(2, plan.input_channels, 32, 48)
    with torch.no_grad():  # equal up to the summation order of its layout (channels_last on a CPU)
        torch.testing.assert_close(loaded(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("saved", ["contiguous", "channels_last"])
def test_weights_load_in_the_networks_own_cpu_layout(model, tmp_path, saved):
    """Whatever layout a checkpoint was saved in (a GPU run saves channels_last), on a CPU the study's network runs
    channels_last (measured faster there; bench/cpu_layout.py) with its input in that layout too, and gives the
    same probabilities as the default layout."""
    import torch

    from mslpipe import architectures, checkpoints

    payload = checkpoints.load(model)
    fmt = torch.channels_last if saved == "channels_last" else torch.contiguous_format
    weights = {k: v.contiguous(memory_format=fmt) if v.ndim == 4 else v for k, v in payload["model"].items()}
    path = checkpoints.save(tmp_path / "w.pt", {**payload, "model": weights})
    predictor = inference.load_predictor([path], device="cpu")
    net = predictor.models[0]
    assert architectures.memory_format(net, "cpu") == torch.channels_last
    convs = [p for p in net.parameters() if p.ndim == 4 and p.shape[-1] > 1]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)

    seen = []
    hook = net.register_forward_pre_hook(lambda _m, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    rng = np.random.default_rng(0)
    image = rng.normal(size=(5, predictor.plan.input_channels // (2 * predictor.plan.context_slices + 1), 40, 44))
    image = image.astype(np.float32)
    kwargs = dict(divisor=predictor.divisor, device="cpu", context=predictor.plan.context_slices)
    fast = inference.predict_volume([net], image, **kwargs)
    hook.remove()
    assert seen and all(seen)
    plain = net.to(memory_format=torch.contiguous_format)
    plain.channels_last_on_cpu = False  # the default layout, as before the measurement
    assert architectures.memory_format(plain, "cpu") == torch.contiguous_format
    np.testing.assert_allclose(inference.predict_volume([plain], image, **kwargs), fast, atol=1e-5)


def test_layout_per_network_and_device():
    import torch

    from mslpipe import architectures

    study = architectures.build("leaky_unet", in_channels=3, base_channels=4, max_channels=16, depth=2)
    nnunet = architectures.build("nnunet2d", in_channels=3, base_channels=4)
    assert architectures.memory_format(study, "cpu") == torch.channels_last
    assert architectures.memory_format(nnunet, "cpu") == torch.contiguous_format  # instance norm: slower in it
    assert architectures.memory_format(nnunet, "cuda") == torch.channels_last
    assert architectures.memory_format(torch.nn.Conv2d(1, 1, 3), "cpu") == torch.contiguous_format  # plug-ins
    assert architectures.memory_format(torch.compile(study), "cpu") == torch.channels_last  # answers for its module


@pytest.mark.parametrize("damage", ["missing", "shape"])
def test_weights_that_do_not_fit_are_refused(model, tmp_path, damage):
    import torch

    from mslpipe import checkpoints

    payload = checkpoints.load(model)
    weights = dict(payload["model"])
    key = next(k for k, v in weights.items() if v.ndim == 4)
    if damage == "missing":
        del weights[key]
    else:
        weights[key] = torch.zeros(1, 1, 3, 3)
    bad = checkpoints.save(tmp_path / "bad.pt", {**payload, "model": weights})
    with pytest.raises(MslpipeError, match="do not fit") as info:
        inference.load_predictor([bad], device="cpu")
    assert str(bad) in str(info.value)


def test_checkpoints_with_other_preprocessing_are_refused(model, tmp_path):
    from mslpipe import checkpoints

    payload = checkpoints.load(model)
    plan = dict(payload["meta"]["plan"], crop_margin=payload["meta"]["plan"]["crop_margin"] + 2, hash="")
    other = checkpoints.save(tmp_path / "other.pt", {**payload, "meta": {**payload["meta"], "plan": plan}})
    with pytest.raises(MslpipeError, match="different preprocessing") as info:
        inference.load_predictor([model, other], device="cpu")
    assert str(other) in str(info.value)


def test_a_scan_unlike_the_training_scans_is_segmented_with_a_warning(model, scan, tmp_path, caplog):
    """A whole head (bright scalp around the brain, as a scan that was not skull-stripped) is far larger than the
    planned scans' brains: `predict` says so, naming the file, and still writes its mask."""
    import logging

    data, affine = scan
    m = 8
    head = np.pad(data, m)
    head[:4], head[-4:], head[:, :4], head[:, -4:], head[:, :, :4], head[:, :, -4:] = (float(data.max()),) * 6
    inp = tmp_path / "in"
    save_nifti(inp / "head.nii.gz", head, affine, dtype=np.float32)
    save_nifti(inp / "brain.nii.gz", data, affine, dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="mslpipe.preprocess"):
        report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu", report=True)
    assert sorted(report.written) == ["brain", "head"] and not report.failed and report.warned == ["head"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "head.nii.gz" in warnings[0] and "not skull-stripped" in warnings[0], warnings
    assert load_image(tmp_path / "out" / "head.nii.gz")[0].shape == head.shape
    # the lesion report carries it: per-case JSON, report.csv's warnings column, a flag on the page
    from mslpipe import report as lesion_report
    from mslpipe.io import read_json

    assert read_json(tmp_path / "out" / "brain.lesions.json")["warnings"] == []
    assert "not skull-stripped" in read_json(tmp_path / "out" / "head.lesions.json")["warnings"][0]
    rows = (tmp_path / "out" / "report.csv").read_text().splitlines()
    assert rows[0].split(",") == list(lesion_report.REPORT_FIELDS) and rows[0].endswith(",warnings")
    assert rows[1].startswith("brain,") and rows[1].endswith(",") and "not skull-stripped" in rows[2]
    page = (tmp_path / "out" / "report.html").read_text()
    assert page.count('class="warn"') == 1 and "Check this scan: brain mask" in page


def test_where_the_time_goes_per_step(model, scan, tmp_path):
    """predict reports loading the models and its parts, each case's steps (on the main thread and beside it) and
    the writes; the CLI prints it as one line."""
    data, affine = scan
    inp = tmp_path / "in"
    for name in ("a", "b"):
        save_nifti(inp / f"{name}.nii.gz", data, affine, dtype=np.float32)
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert sorted(report.case_timings) == ["a", "b"] and report.load_s > 0
    assert list(report.load_parts) == ["torch import", "checkpoints", "device"]
    assert sum(report.load_parts.values()) <= report.load_s
    for t in report.case_timings.values():
        assert set(t) == set(predict.MAIN_STEPS + predict.BACKGROUND_STEPS)
        assert all(v >= 0 for v in t.values()) and t["network_s"] > 0 and t["write_s"] > 0
    # the line adds up the main thread's path: imports, models, waits, network, the writes' tail, the rest
    main = sum(t[k] for t in report.case_timings.values() for k in predict.MAIN_STEPS)
    steps = 0.5 + report.load_s + report.write_wait_s + main
    line = report.timing_summary(total_s=steps + 1.0, imports_s=0.5)
    assert line.startswith(f"{steps + 1.0:.1f} s: imports 0.50 s; models ") and "per scan (2)" in line
    assert "(torch import " in line and "beside them, per scan: reading " in line
    assert line.endswith("other (finding inputs, reports) 1.00 s")
    rerun = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert rerun.skipped == ["a", "b"] and rerun.timing_summary() is None  # nothing segmented, nothing to say

    from typer.testing import CliRunner

    from mslpipe.cli import app

    out = CliRunner().invoke(app, ["predict", "-i", str(inp), "-o", str(tmp_path / "cli"), "--checkpoint",
                                   str(model), "--device", "cpu"])
    assert out.exit_code == 0, out.output
    assert "time: " in out.stdout and "network" in out.stdout and "per scan (2)" in out.stdout


@pytest.mark.parametrize("readers", [1, 3])
def test_the_pipeline_gives_what_one_scan_at_a_time_gives(model, scan, tmp_path, monkeypatch, readers):
    """predict reads and preprocesses the next scans (several at once beside a GPU) and postprocesses and writes
    the last one beside the network: each output is exactly what predict_case, the steps one after the other,
    gives for that scan, and the cases come out in order."""
    monkeypatch.setattr(predict, "reader_count", lambda predictor: readers)
    data, affine = scan
    inp = tmp_path / "in"
    variants = {"a": data, "b": data[::-1].copy(), "c": np.clip(data * 1.3, 0, None)}
    for name, arr in variants.items():
        save_nifti(inp / f"{name}.nii.gz", arr, affine, dtype=np.float32)
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu", save_probabilities=True)
    assert report.written == ["a", "b", "c"] and not report.failed
    predictor = inference.load_predictor([model], device="cpu")
    for name, arr in variants.items():
        mask, prob = inference.predict_case(predictor, [arr], affine)
        assert np.array_equal(load_image(tmp_path / "out" / f"{name}.nii.gz")[0], mask)
        assert np.allclose(load_image(tmp_path / "out" / "probabilities" / f"{name}.nii.gz")[0], prob, atol=1e-6)


def test_finished_volumes_wait_for_a_slow_writer(model, scan, tmp_path, monkeypatch):
    """At most MAX_QUEUED_WRITES finished cases are held in memory: with the writer stalled, the network stops."""
    import threading
    import time

    data, affine = scan
    inp = tmp_path / "in"
    for i in range(5):
        save_nifti(inp / f"s{i}.nii.gz", data, affine, dtype=np.float32)
    predictor = inference.load_predictor([model], device="cpu")
    calls, release, real_save = [], threading.Event(), predict.save_nifti

    def network(image, tta=False):
        calls.append(time.perf_counter())
        return np.zeros((image.shape[0], *image.shape[2:]), dtype=np.float32)

    def stalled_save(*args, **kwargs):
        release.wait(timeout=30)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(predictor, "run_volume", network)
    monkeypatch.setattr(predict, "save_nifti", stalled_save)
    sources = datasets.gather_sources(inp)
    done = []
    worker = threading.Thread(target=lambda: done.append(predict.predict_sources(predictor, sources, tmp_path / "o")))
    worker.start()
    deadline = time.perf_counter() + 30
    while len(calls) < predict.MAX_QUEUED_WRITES + 1 and time.perf_counter() < deadline:
        time.sleep(0.01)
    time.sleep(0.5)  # time enough for more networks, were the queue unbounded
    # the writer holds one case, MAX_QUEUED_WRITES wait in its queue: the network ran once more than that
    assert len(calls) == predict.MAX_QUEUED_WRITES + 1, len(calls)
    release.set()
    worker.join(timeout=60)
    assert done and done[0].written == [f"s{i}" for i in range(5)] and len(calls) == 5
    assert all(t["write_queue_wait_s"] >= 0 for t in done[0].case_timings.values())


def test_readers_per_device():
    class Fake:
        def __init__(self, device):
            self.device = device

    assert predict.reader_count(Fake("cuda"), cpus=2) == 2 and predict.reader_count(Fake("cpu"), cpus=16) == 1
    assert predict.reader_count(Fake("cuda"), cpus=12) == 3 and predict.reader_count(Fake("cuda"), cpus=64) == 4
    assert predict.reader_count(object()) == 1  # an ONNX Runtime predictor runs on the CPU


def test_an_output_folder_that_cannot_be_made_is_one_clear_error(model, scan, tmp_path):
    data, affine = scan
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    (tmp_path / "taken").write_text("a file where the output folder's parent should be")
    with pytest.raises(MslpipeError, match="cannot create this folder") as exc:
        predict.run(tmp_path / "in", tmp_path / "taken" / "out", dirs=None, checkpoint=[model], device="cpu")
    assert str(tmp_path / "taken" / "out") in str(exc.value)


def test_progress_is_told_each_scan_and_the_count(model, scan, tmp_path):
    data, affine = scan
    for name in ("a", "b"):
        save_nifti(tmp_path / "in" / f"{name}.nii.gz", data, affine, dtype=np.float32)
    (tmp_path / "in" / "c.nii.gz").write_bytes(b"not a nifti")
    calls = []
    predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu",
                progress=lambda *args: calls.append(args))
    assert calls == [(1, 3, "a"), (2, 3, "b"), (3, 3, "c")]  # a failed scan counts as done


def test_each_run_leaves_a_provenance_record(model, scan, tmp_path):
    """OUT/provenance/ gets one JSON per run that wrote or failed something: mslpipe's version, the models, plan,
    device and settings, and which input each mask came from; a run that only skips leaves none."""
    import json

    from mslpipe import __version__

    data, affine = scan
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")  # skips only
    (tmp_path / "in" / "b.nii.gz").write_bytes(b"not a nifti")
    predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[model], device="cpu", tta=True,
                overwrite=True)
    records = [json.loads(p.read_text()) for p in sorted((tmp_path / "out" / "provenance").glob("predict_*.json"))]
    assert len(records) == 2
    first, second = sorted(records, key=lambda r: len(r["failed"]))
    assert first["mslpipe_version"] == __version__ and first["models"] == [str(model)]
    assert first["written"] == {"a": [str((tmp_path / "in" / "a.nii.gz").resolve())]} and first["failed"] == {}
    assert first["device"] == "cpu" and first["tta"] is False and first["plan_hash"]
    assert "min_lesion_mm3" in first["postprocessing"]
    assert second["tta"] is True and list(second["written"]) == ["a"] and list(second["failed"]) == ["b"]


def test_the_first_scan_is_read_while_the_models_load(model, scan, tmp_path, monkeypatch):
    """With the plan beside the checkpoint, the first scan's reading and preprocessing start before the models
    load, and that work is used: each scan is read once, and the masks are what one scan at a time gives."""
    import threading

    data, affine = scan
    inp = tmp_path / "in"
    for name, arr in {"a": data, "b": data[::-1].copy()}.items():
        save_nifti(inp / f"{name}.nii.gz", arr, affine, dtype=np.float32)
    reads, first_read_started = [], threading.Event()
    real_read, real_load = predict.read_scan, inference.load_predictor

    def read(src, plan):
        reads.append(src.case)
        first_read_started.set()
        return real_read(src, plan)

    def load(*args, **kwargs):
        assert first_read_started.wait(timeout=60), "the first scan was not being read while the models loaded"
        return real_load(*args, **kwargs)

    monkeypatch.setattr(predict, "read_scan", read)
    monkeypatch.setattr(inference, "load_predictor", load)
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert report.written == ["a", "b"] and not report.failed and sorted(reads) == ["a", "b"]
    predictor = real_load([model], device="cpu")
    for name, arr in {"a": data, "b": data[::-1].copy()}.items():
        mask, _ = inference.predict_case(predictor, [arr], affine)
        assert np.array_equal(load_image(tmp_path / "out" / f"{name}.nii.gz")[0], mask)


def test_an_early_read_by_another_plan_is_not_used(model, scan, tmp_path, monkeypatch):
    """A plan.json beside the checkpoint that is not the checkpoint's own plan (files mixed by hand): the early
    read is dropped and the scan is preprocessed again by the checkpoint's plan; and a model that fails to load
    is still one clear error."""
    from mslpipe.plans import load_plan, save_plan

    data, affine = scan
    save_nifti(tmp_path / "in" / "a.nii.gz", data, affine, dtype=np.float32)
    copy = tmp_path / "fold" / "checkpoint_final.pt"
    copy.parent.mkdir()
    shutil.copy(model, copy)
    other = load_plan(model.parent / "plan.json")
    other.crop_margin += 3
    save_plan(other, copy.parent / "plan.json")
    plans_read = []
    real_read = predict.read_scan
    monkeypatch.setattr(predict, "read_scan", lambda src, plan: plans_read.append(plan.crop_margin)
                        or real_read(src, plan))
    report = predict.run(tmp_path / "in", tmp_path / "out", dirs=None, checkpoint=[copy], device="cpu")
    assert report.written == ["a"] and sorted(plans_read) == sorted([other.crop_margin, other.crop_margin - 3])
    mask, _ = inference.predict_case(inference.load_predictor([model], device="cpu"), [data], affine)
    assert np.array_equal(load_image(tmp_path / "out" / "a.nii.gz")[0], mask)
    copy.write_bytes(b"not a checkpoint")
    with pytest.raises(MslpipeError) as info:
        predict.run(tmp_path / "in", tmp_path / "out2", dirs=None, checkpoint=[copy], device="cpu")
    assert str(copy) in str(info.value)


def test_the_final_model_is_found_by_name_and_when_no_fold_is_trained(dirs):
    """`--folds final` names `train --fold final`'s model; by default the cross-validation folds are the ensemble and
    the final model stands in only where no fold is trained."""
    root = dirs.results_dir("syn", "leaky_unet")

    def trained(fold):
        (root / f"fold_{fold}").mkdir(parents=True)
        (root / f"fold_{fold}" / "checkpoint_final.pt").write_bytes(b"")
        return root / f"fold_{fold}" / "checkpoint_final.pt"

    with pytest.raises(MslpipeError, match="no trained folds of leaky_unet"):
        predict.find_checkpoints(dirs, "syn", "leaky_unet", None)
    final = trained("final")
    assert predict.find_checkpoints(dirs, "syn", "leaky_unet", None) == [final]
    folds = [trained(0), trained(2)]
    assert predict.find_checkpoints(dirs, "syn", "leaky_unet", None) == folds
    assert predict.find_checkpoints(dirs, "syn", "leaky_unet", ["final"]) == [final]
    assert predict.find_checkpoints(dirs, "syn", "leaky_unet", [2, "final"]) == [folds[1], final]
    with pytest.raises(MslpipeError, match="fold not trained"):
        predict.find_checkpoints(dirs, "syn", "leaky_unet", [1])


def test_an_unknown_architecture_is_named_as_such(planned, tmp_path, scan_path):
    """--arch with a name no network has, where nothing is trained under it: "unknown architecture", naming the known
    ones, from predict, export and evaluate, rather than "no trained folds" and a train command that cannot run."""
    from mslpipe import export, workflow

    d, _ = planned
    for call in (lambda: predict.run(scan_path, tmp_path / "out", dirs=d, dataset="syn", arch="bogus", device="cpu"),
                 lambda: export.run(tmp_path / "m.onnx", dirs=d, dataset="syn", arch="bogus"),
                 lambda: workflow.evaluate_dataset("syn", d, arch="bogus", device="cpu")):
        with pytest.raises(MslpipeError, match="unknown architecture 'bogus'; known: .*leaky_unet"):
            call()
    assert not (tmp_path / "out").exists() and not (tmp_path / "m.onnx").exists()


def test_a_dataset_given_as_input_is_segmented_by_its_test_scans_and_says_so_when_it_has_none(planned, synth_root):
    """-i a whole dataset means its test scans (test-only ones, or the test split of -d NAME's plan). A dataset with
    none was refused with "give -d NAME" even where -d was given; the message now says what a dataset input means."""
    d, result = planned
    test_subjects = set(result["splits"]["test"])
    sources = datasets.gather_sources(synth_root, ["flair"], d, "syn")
    assert sources and {s.case.split("_")[0] for s in sources} == test_subjects
    with pytest.raises(MslpipeError, match="dataset has no test scans .*give -d NAME after `mslpipe plan`"):
        datasets.gather_sources(synth_root, ["flair"], None, None)
    with pytest.raises(MslpipeError, match="none of this one's is a test-only scan or a subject of other's test"):
        _other_split(d, synth_root)


def _other_split(d, synth_root):
    """A plan named "other" whose test split holds a subject the synthetic dataset does not have."""
    from mslpipe.io import write_json

    write_json(d.plan_dir("other") / "splits.json", {"test": ["elsewhere01"]})
    try:
        return datasets.gather_sources(synth_root, ["flair"], d, "other")
    finally:
        (d.plan_dir("other") / "splits.json").unlink()
        d.plan_dir("other").rmdir()


def test_overwriting_without_probabilities_removes_the_earlier_runs_map(model, scan, tmp_path):
    """A mask rewritten with --overwrite but without --save-probabilities must not keep an earlier run's probability
    map beside it: compare and the lesion report read that map as the new mask's."""
    data, affine = scan
    inp, out = tmp_path / "in", tmp_path / "out"
    save_nifti(inp / "a.nii.gz", data, affine, dtype=np.float32)
    predict.run(inp, out, dirs=None, checkpoint=[model], device="cpu", save_probabilities=True)
    assert (out / "probabilities" / "a.nii.gz").is_file()
    save_nifti(inp / "a.nii.gz", np.clip(data * 1.3, 0, None), affine, dtype=np.float32)
    again = predict.run(inp, out, dirs=None, checkpoint=[model], device="cpu", overwrite=True)
    assert again.written == ["a"] and (out / "a.nii.gz").is_file()
    assert not (out / "probabilities" / "a.nii.gz").exists()


def test_hidden_files_in_an_input_folder_are_no_scans(model, scan, tmp_path):
    """A killed write leaves its temporary (.NAME.xxx.tmp.nii.gz) behind; a folder holding one was refused as an
    unsafe case name. Hidden files are passed over."""
    data, affine = scan
    inp = tmp_path / "in"
    save_nifti(inp / "a.nii.gz", data, affine, dtype=np.float32)
    (inp / ".a.nii.gz.k2j4x.tmp.nii.gz").write_bytes(b"")
    report = predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu")
    assert report.written == ["a"] and not report.failed


def test_the_probability_map_is_written_before_the_mask_that_marks_a_case_finished(model, scan, tmp_path, monkeypatch):
    """Killed between the two writes, a case must not pass for finished without its map: the map goes first, the
    mask (what a rerun looks for) last."""
    data, affine = scan
    inp = tmp_path / "in"
    save_nifti(inp / "a.nii.gz", data, affine, dtype=np.float32)
    order = []
    real_save = predict.save_nifti
    monkeypatch.setattr(predict, "save_nifti", lambda path, *a, **k: order.append(path.parent.name) or
                        real_save(path, *a, **k))
    predict.run(inp, tmp_path / "out", dirs=None, checkpoint=[model], device="cpu", save_probabilities=True)
    assert order == ["probabilities", "out"]
