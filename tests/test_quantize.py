"""int8 export (`mslpipe export --precision int8`): calibration slices, the quantized graph, the agreement check,
`predict --onnx` on an int8 model, and the refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mslpipe import checkpoints, export, onnx_inference, predict, preprocess, quantize  # noqa: E402
from mslpipe.errors import MslpipeError  # noqa: E402
from mslpipe.io import load_image  # noqa: E402
from mslpipe.plans import Plan  # noqa: E402

TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}


def _volume(n_slices: int, h: int, w: int, empty_ends: int, seed: int = 0) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n_slices, 1, h, w)).astype(np.float32)
    v[:empty_ends] = 0
    v[n_slices - empty_ends:] = 0
    return v


def test_calibration_and_check_slices_are_brain_slices_spread_and_disjoint():
    volumes = [_volume(40, 20, 24, 5), _volume(30, 28, 16, 3, seed=1)]
    calibration, check = quantize.split_slices(volumes, n_calibration=10, n_check=20)
    assert len(calibration) == 10 and len(check) == 20
    assert not set(calibration) & set(check)
    for v, s in calibration + check:
        assert np.abs(volumes[v][s]).max() > 0  # never an empty slice
    assert {v for v, _ in calibration} == {0, 1}  # both scans, first and last brain slice included
    assert calibration[0] == (0, 5) and calibration[-1] == (1, 26)
    # few brain slices: at most half go to calibration, the check gets the rest
    small = [_volume(7, 8, 8, 1)]
    calibration, check = quantize.split_slices(small, n_calibration=4, n_check=10)
    assert len(calibration) == 2 and len(check) == 3 and not set(calibration) & set(check)
    for empty in (np.zeros((4, 1, 8, 8), np.float32), _volume(3, 8, 8, 1)):
        with pytest.raises(MslpipeError, match="too few"):
            quantize.split_slices([empty])


@pytest.mark.parametrize("context", [0, 1])
def test_batches_share_one_padded_shape_and_keep_the_slices(context):
    volumes = [_volume(10, 20, 24, 0), _volume(12, 28, 16, 0, seed=1)]
    pairs = [(0, 0), (0, 4), (1, 2), (1, 11), (0, 9)]
    out = quantize.batches(volumes, pairs, divisor=8, context=context, batch_size=2)
    assert [len(b) for b in out] == [2, 2, 1]
    assert {b.shape[1:] for b in out} == {(2 * context + 1, 32, 24)}  # one H×W, a multiple of 8
    stacked = np.concatenate(out)
    first = preprocess.with_context(volumes[0], np.array([0, 4, 9]), context)
    assert np.array_equal(stacked[:3, :, :20, :24], first) and not stacked[:3, :, 20:].any()
    assert np.array_equal(stacked[3:, :, :28, :16], preprocess.with_context(volumes[1], np.array([2, 11]), context))


@pytest.fixture(scope="module")
def int8_model(trained, tmp_path_factory):
    """The tiny trained fold exported twice through `-d NAME`: fp32 and int8 (calibrated on its training scans)."""
    d, _ = trained
    folder = tmp_path_factory.mktemp("int8")
    fp32 = export.run(folder / "fp32.onnx", dirs=d, dataset="syn")
    int8 = export.run(folder / "int8.onnx", dirs=d, dataset="syn", precision="int8")
    return folder, fp32, int8


def _initialisers_and_producers(path):
    import onnx

    graph = onnx.load(str(path)).graph
    return {i.name for i in graph.initializer}, {o: n.op_type for n in graph.node for o in n.output}, graph


def test_int8_export_quantizes_all_but_the_first_and_last_convolution(int8_model):
    folder, fp32, meta = int8_model
    described = onnx_inference.read_sidecar(folder / "int8.onnx")
    assert described["precision"] == "int8" and fp32["precision"] == "fp32" and "quantization" not in fp32
    q = described["quantization"]
    assert "training scans" in q["calibration"]["source"] and q["calibration"]["volumes"] >= 1
    assert 0 < q["calibration"]["slices"] <= quantize.CALIBRATION_SLICES
    assert 0 < q["check"]["slices"] <= quantize.CHECK_SLICES and q["check"]["min_agreement"] == quantize.MIN_AGREEMENT
    initialisers, producer, graph = _initialisers_and_producers(folder / "int8.onnx")
    convs = [n for n in graph.node if n.op_type == "Conv"]
    assert sorted({convs[0].name, convs[-1].name}) == q["float_nodes"]
    for conv in convs:  # a quantized convolution reads its weights through DequantizeLinear
        quantized = producer.get(conv.input[1]) == "DequantizeLinear"
        assert quantized == (conv.name not in q["float_nodes"]), conv.name
        if not quantized:
            assert conv.input[1] in initialisers
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) >= len(convs) - 2
    assert not list(folder.glob(".*"))  # no temporary files left


def test_predict_onnx_runs_an_int8_model_close_to_fp32(int8_model, scan_path, tmp_path):
    folder, _, _ = int8_model
    result = predict.run(scan_path, tmp_path / "o", dirs=None, onnx=folder / "int8.onnx")
    assert len(result.written) == 1 and not result.failed
    mask, affine = load_image(tmp_path / "o" / f"{result.written[0]}.nii.gz")
    channels, scan_affine = load_image(scan_path)
    assert mask.shape == channels.shape and np.allclose(affine, scan_affine)
    p = {name: onnx_inference.predict_case(onnx_inference.load_onnx_predictor(folder / f"{name}.onnx"),
                                           [channels], scan_affine)[1] for name in ("fp32", "int8")}
    brain = channels > 0
    assert np.corrcoef(p["fp32"][brain], p["int8"][brain])[0, 1] > 0.95
    top = p["fp32"][brain] >= np.quantile(p["fp32"][brain], 0.95)  # the tiny model's most lesion-like 5 %
    top8 = p["int8"][brain] >= np.quantile(p["fp32"][brain], 0.95)
    assert 2 * (top & top8).sum() / (top.sum() + top8.sum()) > 0.8


@pytest.fixture
def random_checkpoint(tmp_path, scan_path):
    """Random weights, the output bias set so that the scan's brain is about 10 % foreground: masks to compare."""
    import torch

    from mslpipe import architectures

    torch.manual_seed(0)
    kwargs = {"base_channels": 4, "max_channels": 16, "depth": 3}
    plan = Plan(dataset="q", architecture="leaky_unet", arch_kwargs=kwargs, target_device="cpu").finalised()
    model = architectures.build("leaky_unet", in_channels=plan.input_channels, **kwargs).eval()
    image, _, _ = preprocess.preprocess_volume(list(load_image(scan_path)[:1]), load_image(scan_path)[1], plan)
    padded, _ = preprocess.pad_to_multiple(image, 8)
    x = torch.from_numpy(preprocess.with_context(padded, np.arange(len(padded)), plan.context_slices))
    with torch.no_grad():
        logits = model(x)[:, 0][x[:, plan.context_slices] != 0]
        model.head.bias -= torch.quantile(logits, 0.9)
    return checkpoints.save(tmp_path / "random.pt", {"model": model.state_dict(), "meta": {"plan": plan.to_dict()}})


def test_int8_from_scans_and_refused_when_it_disagrees_with_fp32(random_checkpoint, scan_path, tmp_path):
    out = tmp_path / "models" / "m.onnx"
    # the TorchScript exporter: its trace takes a second where torch.export's takes ten (the int8_model fixture's
    # exports go through torch.export)
    meta = export.run(out, dirs=None, checkpoint=random_checkpoint, precision="int8", calibration=scan_path,
                      exporter="torchscript")
    check = meta["quantization"]["check"]
    assert meta["quantization"]["calibration"] == {"source": f"scans in {scan_path}", "volumes": 1,
                                                   "slices": meta["quantization"]["calibration"]["slices"]}
    assert check["float_foreground_voxels"] > 1000 and check["mask_dice"] >= quantize.MIN_AGREEMENT
    assert 0 < check["voxels_differing"] < check["voxels"]
    refused = tmp_path / "models" / "refused.onnx"
    with pytest.raises(MslpipeError, match="agree with the float model's only at Dice") as err:
        export.export_onnx(random_checkpoint, refused, precision="int8", min_agreement=1.01, exporter="torchscript",
                           calibration=lambda plan: (export.volumes_from_scans(scan_path, plan), "one scan"))
    assert "--precision fp32" in str(err.value) and str(refused) in str(err.value)  # the output, not a temp file
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.onnx", "m.onnx.json"]  # nothing half-written


def test_calibration_must_match_the_models_preprocessing(trained):
    d, result = trained
    plan = Plan.from_dict(checkpoints.load(result["fold_dir"] / "checkpoint_final.pt")["meta"]["plan"])
    cases = sorted(p.stem for p in d.preprocessed_dir("syn").glob("*.json"))[:2]
    assert len(quantize.volumes_from_preprocessed(d.preprocessed_dir("syn"), cases, plan)) == 2
    other = Plan.from_dict({**plan.to_dict(), "crop_margin": plan.crop_margin + 3})
    with pytest.raises(MslpipeError, match="preprocessed with other settings"):
        quantize.volumes_from_preprocessed(d.preprocessed_dir("syn"), cases, other)
    with pytest.raises(MslpipeError, match="no training scans"):
        quantize.volumes_from_preprocessed(d.preprocessed_dir("syn"), [], plan)


def test_cli_int8_and_its_refusals(trained, random_checkpoint, scan_path, tmp_path):
    d, _ = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    cwd = tmp_path / "cwd"
    cwd.mkdir()

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mslpipe", *map(str, args)], capture_output=True, **TEXT,
                              env={**env, "PYTHONPATH": os.pathsep.join(sys.path)}, cwd=cwd)

    # the legacy exporter's graph (other node names, Constant nodes) quantizes too
    ok = cli("--plans", d.plans, "--preprocessed", d.preprocessed, "--results", d.results, "export", "-d", "syn",
             "--precision", "int8", "--exporter", "torchscript", "-o", tmp_path / "ok.onnx")
    assert ok.returncode == 0, ok.stderr
    assert "int8, torchscript exporter" in ok.stdout and "calibrated on" in ok.stdout
    # the logit check is of the fp32 export the int8 model is made from, and says so (the int8 file has its own)
    assert "its fp32 export before quantization vs torch max logit difference" in ok.stdout
    meta = json.loads((tmp_path / "ok.onnx.json").read_text())
    assert meta["export_check"]["model"] == "fp32 before quantization"
    assert any(step.startswith("correct the bias field: N4") for step in meta["preprocessing"]["steps"])
    # ONNX Runtime's quantizer logs advice on the root logger: only mslpipe's own lines reach the terminal (here
    # that the tiny model's masks are too empty to compare)
    assert all(line.startswith("WARNING mslpipe.quantize:") for line in ok.stderr.splitlines()), ok.stderr
    _, _, graph = _initialisers_and_producers(tmp_path / "ok.onnx")
    assert "QuantizeLinear" in {n.op_type for n in graph.node}
    corrupt = tmp_path / "bad" / "broken.nii.gz"
    corrupt.parent.mkdir()
    corrupt.write_bytes(b"not a nifti")
    for args, words in ((("--precision", "int8"), "needs calibration scans"),
                        (("--precision", "fp16"), "precision must be one of"),
                        (("--precision", "int8", "--calibration", tmp_path / "none"), "not found"),
                        (("--precision", "int8", "--calibration", corrupt.parent), "broken.nii.gz")):
        bad = cli("export", "--checkpoint", random_checkpoint, "-o", tmp_path / "x.onnx", *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and words in lines[0], bad.stderr
    assert not list(tmp_path.glob("x.onnx*")) and not list(tmp_path.glob(".x.onnx*"))
    assert not list(cwd.iterdir())  # the quantizer's scratch files went elsewhere


def test_normalisation_layers_stay_float(tmp_path):
    """nnU-Net's network keeps instance norm in the exported graph: those nodes are left out of quantization."""
    import onnx

    from mslpipe import architectures

    kwargs = {"base_channels": 4, "max_channels": 16, "depth": 3}
    plan = Plan(dataset="q", architecture="nnunet2d", arch_kwargs=kwargs, target_device="cpu").finalised()
    model = architectures.build("nnunet2d", in_channels=plan.input_channels, **kwargs).eval()
    ckpt = checkpoints.save(tmp_path / "n.pt", {"model": model.state_dict(), "meta": {"plan": plan.to_dict()}})
    export.export_onnx(ckpt, tmp_path / "n.onnx", exporter="torchscript")
    graph = onnx.load(str(tmp_path / "n.onnx")).graph
    norms = {n.name for n in graph.node if n.op_type == "InstanceNormalization"}
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    assert norms and quantize.float_nodes(tmp_path / "n.onnx") == sorted(norms | {convs[0], convs[-1]})
