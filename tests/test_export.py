"""ONNX export and `predict --onnx`: parity with torch, dynamic shapes, no torch at inference, bad files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from mslpipe import export, inference, onnx_inference, predict  # noqa: E402
from mslpipe.errors import MslpipeError  # noqa: E402
from mslpipe.io import load_image  # noqa: E402

LOGIT_TOLERANCE = 1e-3  # largest |ONNX Runtime logit - torch logit| accepted
MASK_DISAGREEMENT = 1e-3  # at most 0.1 % of a scan's voxels may differ between the two paths
TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}  # the CLI prints UTF-8 whatever the locale


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The tiny trained model, exported through `-d NAME` (its only fold) with the default exporter."""
    d, result = trained
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    meta = export.run(out, dirs=d, dataset="syn")
    return out, meta, result["fold_dir"] / "checkpoint_final.pt"


def _torch_logits(checkpoint, x):
    import torch

    model = inference.load_predictor([checkpoint], device="cpu").models[0]
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


def test_export_writes_model_and_description(exported):
    out, meta, _ = exported
    assert out.is_file() and onnx_inference.sidecar_path(out).is_file()
    assert not list(out.parent.glob("*.data"))  # one self-contained file
    described = onnx_inference.read_sidecar(out)
    assert described["exporter"] in ("dynamo", "torchscript") and described["opset"] >= 17
    assert described["divisor"] == 8 and described["input"]["channels"] == ["flair"]
    assert described["threshold"] == 0.5 and "min_lesion_mm3" in described["postprocessing"]
    assert described["preprocessing"]["normalization"]["scheme"] == "brain_percentile_median_iqr"  # the plan's
    assert described["export_check"]["max_abs_logit_diff"] < LOGIT_TOLERANCE
    import onnx

    model = onnx.load(str(out))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert isinstance(dims[0], str) and isinstance(dims[2], str) and isinstance(dims[3], str)  # dynamic N, H, W


@pytest.mark.parametrize("shape", [(3, 48, 40), (1, 32, 56), (5, 16, 16)])
def test_onnx_runtime_matches_torch(exported, shape):
    out, _, checkpoint = exported
    predictor = onnx_inference.load_onnx_predictor(out)
    n, h, w = shape
    x = np.random.default_rng(1).standard_normal((n, predictor.plan.input_channels, h, w)).astype(np.float32)
    got = predictor.session.run(None, {predictor.input_name: x})[0]
    assert got.shape == (n, 1, h, w)
    assert np.max(np.abs(got - _torch_logits(checkpoint, x))) < LOGIT_TOLERANCE


def test_legacy_exporter_also_matches(trained, tmp_path):
    d, result = trained
    checkpoint = result["fold_dir"] / "checkpoint_final.pt"
    meta = export.export_onnx(checkpoint, tmp_path / "legacy.onnx", exporter="torchscript")
    assert meta["exporter"] == "torchscript" and meta["opset"] == 17
    predictor = onnx_inference.load_onnx_predictor(tmp_path / "legacy.onnx")
    x = np.random.default_rng(2).standard_normal((2, predictor.plan.input_channels, 24, 64)).astype(np.float32)
    session = predictor.session
    assert np.max(np.abs(session.run(None, {"image": x})[0] - _torch_logits(checkpoint, x))) < LOGIT_TOLERANCE


def test_predict_onnx_matches_torch_path(exported, scan_path, tmp_path):
    out, _, checkpoint = exported
    r_onnx = predict.run(scan_path, tmp_path / "onnx", dirs=None, onnx=out)
    r_torch = predict.run(scan_path, tmp_path / "torch", dirs=None, checkpoint=[checkpoint], device="cpu")
    assert r_onnx.written == r_torch.written and not r_onnx.failed
    case = r_onnx.written[0]
    a, aff_a = load_image(tmp_path / "onnx" / f"{case}.nii.gz")
    b, aff_b = load_image(tmp_path / "torch" / f"{case}.nii.gz")
    assert a.shape == b.shape and np.allclose(aff_a, aff_b)
    assert np.mean(a != b) <= MASK_DISAGREEMENT
    # The tiny 2-epoch model finds few or no lesions at 0.5: compare at a threshold that makes the top
    # 5 % of the brain's probabilities foreground, so that the masks compared are not empty.
    channels, affine = load_image(scan_path)
    onnx_predictor = onnx_inference.load_onnx_predictor(out)
    torch_predictor = inference.load_predictor([checkpoint], device="cpu")
    for tta in (False, True):
        _, p_torch = inference.predict_case(torch_predictor, [channels], affine, tta=tta)
        _, p_onnx = onnx_inference.predict_case(onnx_predictor, [channels], affine, tta=tta)
        assert np.max(np.abs(p_onnx - p_torch)) < 1e-4
        pp = {"threshold": float(np.quantile(p_torch[channels > 0], 0.95))}
        m_torch = inference.predict_case(torch_predictor, [channels], affine, tta=tta, postprocessing=pp)[0]
        m_onnx = onnx_inference.predict_case(onnx_predictor, [channels], affine, tta=tta, postprocessing=pp)[0]
        assert m_torch.sum() > 0.01 * (channels > 0).sum()
        assert np.mean(m_onnx != m_torch) <= MASK_DISAGREEMENT


def test_onnx_predict_path_imports_no_torch(exported, scan_path, tmp_path):
    """The CLI's `predict --onnx` in a fresh interpreter where importing torch fails and is recorded."""
    out, _, _ = exported
    code = textwrap.dedent(f"""
        import sys
        attempts = []

        class NoTorch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    attempts.append(name)
                    raise ImportError("torch is blocked in this test")
                return None

        sys.meta_path.insert(0, NoTorch())
        sys.argv = ["mslpipe", "predict", "--onnx", {str(out)!r}, "-i", {str(scan_path)!r}, "-o",
                    {str(tmp_path / "o")!r}]
        import mslpipe.cli
        mslpipe.cli._fast_exit = sys.exit  # a normal exit, so that the checks below run after the command
        try:
            mslpipe.cli.main()
        except SystemExit as exc:
            assert not exc.code, exc.code
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("ATTEMPTS", attempts, "LOADED", loaded)
        assert not attempts and not loaded
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, **TEXT, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ATTEMPTS [] LOADED []" in run.stdout
    assert len(list((tmp_path / "o").glob("*.nii.gz"))) == 1


def test_missing_or_corrupt_onnx_is_one_clear_error(exported, scan_path, tmp_path):
    out, _, _ = exported
    with pytest.raises(MslpipeError, match="ONNX model not found"):
        onnx_inference.load_onnx_predictor(tmp_path / "nothing.onnx")
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(out.read_bytes()[: len(out.read_bytes()) // 3])
    shutil.copy(onnx_inference.sidecar_path(out), onnx_inference.sidecar_path(corrupt))
    with pytest.raises(MslpipeError, match="corrupt or unreadable ONNX model") as err:
        onnx_inference.load_onnx_predictor(corrupt)
    assert "corrupt.onnx" in str(err.value) and "\n" not in str(err.value)
    alone = tmp_path / "alone.onnx"
    shutil.copy(out, alone)
    with pytest.raises(MslpipeError, match="alone.onnx.json"):
        onnx_inference.load_onnx_predictor(alone)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cli = subprocess.run([sys.executable, "-m", "mslpipe", "predict", "--onnx", str(corrupt), "-i", str(scan_path),
                          "-o", str(tmp_path / "o")], capture_output=True, **TEXT, env=env)
    lines = cli.stderr.strip().splitlines()
    assert cli.returncode == 1 and len(lines) == 1 and "corrupt.onnx" in lines[0], cli.stderr


def test_cli_export_and_bad_requests(trained, tmp_path):
    d, result = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "mslpipe", *map(str, args)], capture_output=True, **TEXT,
                              env=env)

    ok = cli("export", "--checkpoint", result["fold_dir"] / "checkpoint_final.pt", "--exporter", "torchscript",
             "-o", tmp_path / "m.onnx")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "m.onnx").is_file() and (tmp_path / "m.onnx.json").is_file()
    assert "ONNX Runtime vs torch max logit difference" in ok.stdout
    assert json.loads((tmp_path / "m.onnx.json").read_text())["export_check"]["model"] == "this file"
    for args, words in ((("-o", tmp_path / "x.onnx"), "--checkpoint"),
                        (("--format", "tflite", "--checkpoint", tmp_path / "c.pt", "-o", tmp_path / "x.onnx"),
                         "onnx"),
                        (("--checkpoint", tmp_path / "nothing.pt", "-o", tmp_path / "x.onnx"), "not found"),
                        (("--checkpoint", result["fold_dir"] / "checkpoint_final.pt", "-o", tmp_path / "x.pt"),
                         ".onnx")):
        bad = cli("export", *args)
        lines = bad.stderr.strip().splitlines()
        assert bad.returncode == 1 and len(lines) == 1 and words in lines[0], bad.stderr
    assert not (tmp_path / "x.onnx").exists()


@pytest.mark.parametrize("context", [0, 2])
def test_other_input_slices_train_predict_and_export(synth_root, tmp_path, context):
    """Plain 2D and 5-slice plans end to end (the shared fixtures use the default 3 slices): the network's first
    convolution takes 2·context+1 slices; torch and ONNX Runtime predict alike."""
    from mslpipe import plan, train
    from mslpipe.plans import Workdirs

    tiny = {"arch_kwargs": {"base_channels": 4, "max_channels": 32, "depth": 3}, "batch_size": 8, "num_workers": 0}
    d = Workdirs.resolve(tmp_path / "raw", tmp_path / "plans", tmp_path / "pre", tmp_path / "results")
    planned = plan.run("ctx", d, input_path=synth_root, device="cpu", overrides={**tiny, "context_slices": context})
    assert planned["plan"].input_channels == 2 * context + 1
    result = train.run("ctx", d, 0, epochs=1, iterations=2, device="cpu", show_progress=False)
    checkpoint = result["fold_dir"] / "checkpoint_final.pt"
    model = inference.load_predictor([checkpoint], device="cpu").models[0]
    assert next(model.parameters()).shape[1] == 2 * context + 1
    out = tmp_path / "ctx.onnx"
    meta = export.export_onnx(checkpoint, out)
    assert meta["export_check"]["max_abs_logit_diff"] < LOGIT_TOLERANCE
    scan = next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz"))
    channels, affine = load_image(scan)
    _, p_torch = inference.predict_case(inference.load_predictor([checkpoint], device="cpu"), [channels], affine)
    _, p_onnx = onnx_inference.predict_case(onnx_inference.load_onnx_predictor(out), [channels], affine)
    assert np.max(np.abs(p_onnx - p_torch)) < 1e-4


def test_export_by_dataset_names_a_missing_or_ambiguous_fold(trained, tmp_path):
    """`export -d NAME`: an untrained fold, several trained folds without --fold, no trained fold and no model at
    all are each refused in one error naming the folder; nothing is written."""
    d, result = trained
    out = tmp_path / "m.onnx"
    with pytest.raises(MslpipeError, match="fold 3 not trained") as info:
        export.run(out, dirs=d, dataset="syn", fold=3)
    assert str(result["fold_dir"].parent / "fold_3") in str(info.value)
    with pytest.raises(MslpipeError, match="say which model"):
        export.run(out, dirs=d)
    with pytest.raises(MslpipeError, match="no trained folds of nnunet2d"):
        export.run(out, dirs=d, dataset="syn", arch="nnunet2d")
    second = result["fold_dir"].parent / "fold_1"
    second.mkdir()
    try:
        shutil.copy(result["fold_dir"] / "checkpoint_final.pt", second / "checkpoint_final.pt")
        with pytest.raises(MslpipeError, match="2 trained folds of leaky_unet: say which with --fold K"):
            export.run(out, dirs=d, dataset="syn")
    finally:
        shutil.rmtree(second)
    assert not list(tmp_path.iterdir())


def test_a_wrong_onnx_description_is_one_clear_error(exported, tmp_path):
    """The description beside an ONNX model: another tool's JSON, a newer format, a missing entry, or a plan whose
    input channels the model does not take are each refused naming the file."""
    import json

    out, _, _ = exported
    meta = json.loads(onnx_inference.sidecar_path(out).read_text())
    model = tmp_path / "m.onnx"
    shutil.copy(out, model)
    plan_channels = meta["plan"]["context_slices"]
    cases = {"format is not": {**meta, "format": "other"},
             "is newer than this mslpipe's": {**meta, "format_version": meta["format_version"] + 1},
             "description has no 'divisor'": {k: v for k, v in meta.items() if k != "divisor"},
             "ONNX model takes": {**meta, "plan": {**meta["plan"], "context_slices": plan_channels + 1, "hash": ""}}}
    for words, bad in cases.items():
        onnx_inference.sidecar_path(model).write_text(json.dumps(bad))
        with pytest.raises(MslpipeError, match=words) as info:
            onnx_inference.load_onnx_predictor(model)
        assert "m.onnx" in str(info.value) and "\n" not in str(info.value)
