"""`mslpipe export`: a trained network as an ONNX model for CPUs and small devices.

Writes ``MODEL.onnx`` (one file, weights inside; input ``image`` N×C×H×W float32, output ``logits``
N×1×H×W: apply a sigmoid for probabilities) with a dynamic batch size and dynamic height and width
(the networks are fully convolutional; H and W must be multiples of ``divisor``), and ``MODEL.onnx.json``
with everything the model expects around it: the plan (channels, slice axis, crop margin, intensity
normalisation), the divisor, the threshold and the postprocessing. :mod:`mslpipe.onnx_inference` runs
it with ONNX Runtime and numpy only (`mslpipe predict --onnx MODEL`).

Exporter: torch's ``torch.export``-based exporter (``dynamo=True``, opset 18, the default since
torch 2.9; needs the ``onnxscript`` package, part of the ``onnx`` extra). Without onnxscript the legacy
TorchScript exporter (``dynamo=False``, opset 17) is used, which torch has deprecated. Both run offline.
The sidecar records which one wrote the model, and every export is checked: ONNX Runtime's logits on
a random batch must match torch's (the largest difference is stored in the sidecar).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe import __version__, inference, onnx_inference, quantize
from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_path, read_json, write_json
from mslpipe.plans import Plan

log = logging.getLogger(__name__)

Calibration = Callable[[Plan], tuple[list[np.ndarray], str]]  # plan -> (preprocessed volumes, where they came from)

EXPORTERS = ("auto", "dynamo", "torchscript")
OPSET = {"dynamo": 18, "torchscript": 17}
CHECK_TOLERANCE = 1e-3  # largest |logit difference| between ONNX Runtime and torch accepted at export


def pick_exporter(exporter: str = "auto") -> str:
    if exporter not in EXPORTERS:
        raise MslpipeError(f"exporter must be one of {', '.join(EXPORTERS)}, not {exporter!r}")
    have_onnxscript = importlib.util.find_spec("onnxscript") is not None
    if exporter == "dynamo" and not have_onnxscript:
        raise MslpipeError("the dynamo exporter needs onnxscript: pip install 'mslpipe[onnx]'")
    if exporter == "auto":
        exporter = "dynamo" if have_onnxscript else "torchscript"
        if exporter == "torchscript":
            log.warning("onnxscript is not installed: using torch's legacy TorchScript ONNX exporter")
    return exporter


@contextlib.contextmanager
def _quiet():
    """torch.onnx prints progress and warns about torchvision and deprecations: keep the log for errors."""
    names = ("torch.onnx", "torch.export", "torch._export", "onnxscript", "onnx_ir", "torch._dynamo")
    levels = {n: logging.getLogger(n).level for n in names}
    try:
        for n in names:
            logging.getLogger(n).setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(None):
            warnings.simplefilter("ignore")
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def _torch_export(model, example, path: Path, exporter: str) -> None:
    import torch

    names = {"input_names": ["image"], "output_names": ["logits"]}
    if exporter == "dynamo":
        dims = {0: torch.export.Dim("batch"), 2: torch.export.Dim("height"), 3: torch.export.Dim("width")}
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=OPSET[exporter],
                          dynamic_shapes=(dims,), external_data=False, verbose=False, **names)
    else:
        axes = {0: "batch", 2: "height", 3: "width"}
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=OPSET[exporter],
                          dynamic_axes={"image": axes, "logits": axes}, **names)


def _check(model, path: Path, divisor: int, n_channels: int) -> dict[str, Any]:
    """Run a random batch through torch and ONNX Runtime (another size than the export's example)."""
    import onnx
    import onnxruntime as ort
    import torch

    onnx.checker.check_model(str(path))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, n_channels, 3 * divisor, 5 * divisor)).astype(np.float32)
    with torch.inference_mode():
        ref = model(torch.from_numpy(x)).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {"image": x})[0]
    diff = float(np.max(np.abs(got - ref)))
    if not diff < CHECK_TOLERANCE:
        raise MslpipeError(f"exported model disagrees with torch (largest logit difference {diff:.3g} >= "
                           f"{CHECK_TOLERANCE})", path)
    return {"input_shape": list(x.shape), "max_abs_logit_diff": diff, "tolerance": CHECK_TOLERANCE}


def export_onnx(checkpoint: str | Path, out: str | Path, *, postprocessing: dict | None = None,
                exporter: str = "auto", precision: str = "fp32", calibration: Calibration | None = None,
                min_agreement: float = quantize.MIN_AGREEMENT) -> dict[str, Any]:
    """Export one checkpoint to ``out`` (``.onnx``) and write ``out.json``; returns the description.

    ``precision="int8"`` quantizes the exported model (:mod:`mslpipe.quantize`) with the scans
    ``calibration(plan)`` returns (preprocessed S×C×H×W volumes, and a sentence saying where they came from).
    """
    out = Path(out)
    if out.suffix != ".onnx":
        raise MslpipeError("the exported model's name must end in .onnx", out)
    if precision not in quantize.PRECISIONS:
        raise MslpipeError(f"precision must be one of {', '.join(quantize.PRECISIONS)}, not {precision!r}")
    if precision == "int8" and calibration is None:
        raise MslpipeError("an int8 model needs calibration scans: --calibration SCANS, or -d NAME to use the "
                           "fold's own training scans")
    exporter = pick_exporter(exporter)
    if importlib.util.find_spec("onnx") is None or importlib.util.find_spec("onnxruntime") is None:
        raise MslpipeError("export needs onnx and onnxruntime: pip install 'mslpipe[onnx]'")
    import torch

    predictor = inference.load_predictor([Path(checkpoint)], device="cpu")
    model, plan, divisor = predictor.models[0].float().eval(), predictor.plan, predictor.divisor
    example = torch.randn(2, plan.input_channels, 4 * divisor, 6 * divisor)
    pp = {**plan.postprocessing, **(postprocessing or {})}
    quantization = None
    with atomic_path(out, suffix=".onnx") as tmp:
        float_path = tmp if precision == "fp32" else tmp.with_name(tmp.name + ".float.onnx")
        try:
            try:
                with _quiet():
                    _torch_export(model, example, float_path, exporter)
            except Exception as exc:  # torch.export / onnxscript raise many types for unsupported networks
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise MslpipeError(f"{plan.architecture} cannot be exported to ONNX with the {exporter} exporter "
                                   f"({reason[:300]})", checkpoint) from exc
            check = _check(model, float_path, divisor, plan.input_channels)
            if precision == "int8":
                volumes, source = calibration(plan)
                quantization = quantize.quantize(float_path, tmp, volumes, divisor=divisor,
                                                 context=plan.context_slices, threshold=pp.get("threshold", 0.5),
                                                 min_agreement=min_agreement, source=source, where=out)
        finally:
            if float_path != tmp:
                float_path.unlink(missing_ok=True)
    meta = {
        "format": onnx_inference.FORMAT,
        "format_version": onnx_inference.FORMAT_VERSION,
        "model": out.name,
        "mslpipe_version": __version__,
        "exporter": exporter,
        "opset": OPSET[exporter],
        "precision": precision,
        "torch_version": torch.__version__,
        "source_checkpoint": str(checkpoint),
        "input": {"name": "image", "dtype": "float32", "layout": "NCHW: slices, channels in plan order",
                  "channels": list(plan.channels), "dynamic": ["batch", "height", "width"]},
        "output": {"name": "logits", "layout": "N1HW", "activation": "none: sigmoid gives probabilities"},
        "divisor": divisor,
        "preprocessing": {
            "steps": [
                "reorient to RAS (closest canonical)",
                "resample to target_spacing (mm, RAS order) when the scan's voxel size differs by more than 5% "
                "(null: never)",
                "brain mask: voxels above 5% of the 99.5th percentile of positive voxels, opened, specks "
                "dropped, holes filled",
                "crop to the brain's bounding box plus crop_margin",
                "correct the bias field: N4 (SimpleITK) with normalization.n4_levels fitting levels when above 0, or "
                "divide by the brain's smooth shading of width normalization.flatfield_mm when above 0",
                "clip to the brain's lower_pct/upper_pct percentiles; inside the brain subtract the mean and divide "
                "by the standard deviation (scheme brain_percentile_zscore) or subtract the median and divide by "
                "the interquartile range / 1.349 (brain_percentile_median_iqr); 0 outside",
                "slices along slice_axis",
                "zero-pad H and W at the end to a multiple of divisor",
            ],
            "target_spacing": plan.target_spacing,
            "slice_axis": plan.slice_axis, "crop_margin": plan.crop_margin, "normalization": plan.normalization,
            "preprocessing_hash": plan.preprocessing_hash(),
        },
        "threshold": pp.get("threshold", 0.5),
        "postprocessing": pp,
        "inference_batch_size": plan.inference_batch_size,
        "export_check": {**check, "model": "fp32 before quantization" if precision == "int8" else "this file"},
        "plan": plan.to_dict(),
    }
    if quantization:
        meta["quantization"] = quantization
    write_json(onnx_inference.sidecar_path(out), meta)
    log.info("exported %s → %s (%s, %s exporter, opset %d; ONNX Runtime vs torch: %.2g)", checkpoint, out,
             precision, exporter, OPSET[exporter], check["max_abs_logit_diff"])
    return meta


def run(out: str | Path, *, dirs, dataset: str | None = None, arch: str | None = None, fold: int | str | None = None,
        checkpoint: Path | None = None, exporter: str = "auto", precision: str = "fp32",
        calibration: Path | None = None) -> dict[str, Any]:
    """`mslpipe export`: ``checkpoint``, or fold ``fold`` of ``dataset`` (the only trained fold if not given).

    With a dataset, the minimum lesion size chosen by `evaluate` (``postprocessing.json``) goes into
    the description, as `predict -d` would apply it. An int8 model is calibrated on the scans
    ``calibration`` (files or a folder, read like `predict`'s input) or, with a dataset and no
    ``calibration``, on the fold's own preprocessed training scans.
    """
    from mslpipe.plans import load_plan

    if calibration is not None and precision != "int8":
        raise MslpipeError("--calibration goes with --precision int8 (an fp32 model is not calibrated)")
    if fold is not None and not (str(fold).isdigit() or fold == "final"):
        raise MslpipeError(f"--fold takes a fold number or 'final', not {fold!r}")
    postprocessing = None
    if checkpoint is None:
        if dataset is None:
            raise MslpipeError("say which model to export: -d NAME [--fold K] or --checkpoint PATH")
        arch = arch or load_plan(dirs.plan_dir(dataset) / "plans.json").architecture
        root = dirs.results_dir(dataset, arch)
        if not root.exists():
            from mslpipe import architectures

            architectures.check_name(arch)
        if fold is None:
            found = sorted(root.glob("fold_*/checkpoint_final.pt"))
            if len(found) != 1:
                raise MslpipeError(f"{len(found)} trained folds of {arch}: say which with --fold K"
                                   if found else f"no trained folds of {arch}", root)
            checkpoint = found[0]
        else:
            checkpoint = root / f"fold_{fold}" / "checkpoint_final.pt"
            if not checkpoint.exists():
                raise MslpipeError(f"fold {fold} not trained (no checkpoint_final.pt)", checkpoint.parent)
        if (root / "postprocessing.json").exists():
            pp = read_json(root / "postprocessing.json")
            postprocessing = {k: pp[k] for k in ("min_lesion_mm3", "connectivity") if k in pp}
    return export_onnx(checkpoint, out, postprocessing=postprocessing, exporter=exporter, precision=precision,
                       calibration=_calibration(Path(checkpoint), dirs, dataset, calibration))


def _calibration(checkpoint: Path, dirs, dataset: str | None, scans: Path | None) -> Calibration | None:
    """Where an int8 model's calibration scans come from: ``scans``, else the fold's training scans."""
    if scans is not None:
        if not Path(scans).exists():
            raise MslpipeError("calibration scans not found", scans)
        return lambda plan: (volumes_from_scans(Path(scans), plan), f"scans in {scans}")
    run_json = checkpoint.parent / "run.json"
    if dataset is None or not run_json.is_file():
        return None
    cases = list(read_json(run_json).get("train", []))
    return lambda plan: (quantize.volumes_from_preprocessed(dirs.preprocessed_dir(dataset), cases, plan),
                         f"the fold's training scans ({len(cases)}), preprocessed")


def volumes_from_scans(path: Path, plan: Plan) -> list[np.ndarray]:
    """Up to ``quantize.MAX_VOLUMES`` scans (a NIfTI file, a folder of them, or DICOM series), read and
    preprocessed as `predict` does: the calibration set for a checkpoint that comes without its dataset."""
    from mslpipe import preprocess
    from mslpipe.datasets import gather_sources

    sources = gather_sources(Path(path), plan.channels)
    out = []
    for i in quantize.spread(len(sources), quantize.MAX_VOLUMES):
        channels, affine = sources[i].read()
        out.append(preprocess.preprocess_volume(channels, affine, plan, where=sources[i].paths[0])[0])
    return out
