"""Inference through ONNX Runtime on the CPU, with numpy and onnxruntime only: no torch at all.

Mirrors :mod:`mslpipe.inference` for a model written by `mslpipe export` (see :mod:`mslpipe.export`):
the same :func:`mslpipe.preprocess.preprocess_volume`, every slice through the network in batches
(zero-padded at the bottom/right to the network's divisor), sigmoid, optional mirroring TTA, the
result mapped back with :func:`mslpipe.preprocess.restore` and the plan's postprocessing applied.

The model file comes with ``MODEL.json`` (e.g. ``model.onnx.json``): the plan it was trained with and
everything its preprocessing needs. Nothing in this module, or in what it imports, imports torch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from mslpipe import preprocess
from mslpipe.errors import MslpipeError
from mslpipe.io import read_json
from mslpipe.plans import CPU_INFERENCE_BATCH, Plan

log = logging.getLogger(__name__)

FORMAT = "mslpipe-onnx"
FORMAT_VERSION = 1


def sidecar_path(model: str | Path) -> Path:
    """Where the preprocessing description of an exported model lives: ``MODEL.json``."""
    model = Path(model)
    return model.with_name(model.name + ".json")


@dataclass
class OnnxPredictor:
    """An ONNX Runtime session and what the model expects (the counterpart of ``inference.Predictor``)."""

    session: Any
    input_name: str
    plan: Plan
    divisor: int
    postprocessing: dict
    meta: dict
    sources: list[str]

    def predict_case(self, channels: list[np.ndarray], affine: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        return predict_case(self, channels, affine, **kwargs)

    def run_volume(self, image: np.ndarray, tta: bool = False) -> np.ndarray:
        """S×C×H×W preprocessed volume → S×H×W probabilities, as ``inference.Predictor.run_volume``."""
        return predict_volume(self.session, self.input_name, image, divisor=self.divisor,
                              batch_size=self.plan.inference_batch_size, tta=tta, context=self.plan.context_slices)


def read_sidecar(model: str | Path) -> dict:
    path = sidecar_path(model)
    if not path.is_file():
        raise MslpipeError(f"no {path.name} beside the ONNX model (written by `mslpipe export`); without it the "
                           "preprocessing the model expects is unknown", model)
    meta = read_json(path)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise MslpipeError(f"not an mslpipe ONNX description (format is not {FORMAT!r})", path)
    if not isinstance(meta.get("format_version"), int) or meta["format_version"] > FORMAT_VERSION:
        raise MslpipeError(f"description format {meta.get('format_version')!r} is newer than this mslpipe's "
                           f"{FORMAT_VERSION}", path)
    for key in ("plan", "divisor", "input", "postprocessing"):
        if key not in meta:
            raise MslpipeError(f"description has no {key!r}", path)
    return meta


def open_session(path: str | Path, threads: int | None = None) -> Any:
    """An ONNX Runtime CPU session for a model file, logging errors only; failures are one MslpipeError."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise MslpipeError("onnxruntime is not installed: pip install 'mslpipe[onnx]'") from exc
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    if threads:
        options.intra_op_num_threads = int(threads)
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for corrupt or invalid models
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MslpipeError(f"corrupt or unreadable ONNX model ({reason[:200]})", path) from exc


def load_onnx_predictor(path: str | Path, threads: int | None = None) -> OnnxPredictor:
    """Open an exported model on the CPU; every failure is one MslpipeError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MslpipeError("ONNX model not found", path)
    meta = read_sidecar(path)
    plan = Plan.from_dict(meta["plan"], where=sidecar_path(path))
    session = open_session(path, threads)
    inputs = session.get_inputs()
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        raise MslpipeError("ONNX model must take one N×C×H×W input", path)
    n_channels = inputs[0].shape[1]
    if isinstance(n_channels, int) and n_channels != plan.input_channels:
        raise MslpipeError(f"ONNX model takes {n_channels} channels but its description's plan gives "
                           f"{plan.input_channels}", path)
    pp = {**plan.postprocessing, **meta["postprocessing"]}
    return OnnxPredictor(session, inputs[0].name, plan, int(meta["divisor"]), pp, meta, [str(path)])


def predict_volume(session: Any, input_name: str, image: np.ndarray, *, divisor: int, batch_size: int = 64,
                   tta: bool = False, return_logits: bool = False, context: int = 0) -> np.ndarray:
    """S×C×H×W volume → S×H×W foreground probabilities (or, with ``return_logits``, logits without TTA);
    ``context`` neighbouring slices on either side as extra channels, as in ``inference.predict_volume``;
    ONNX Runtime runs on the CPU, so at most ``CPU_INFERENCE_BATCH`` slices go through at once."""
    if return_logits and tta:
        raise ValueError("return_logits needs no TTA")
    batch_size = min(batch_size, CPU_INFERENCE_BATCH)
    padded, (h, w) = preprocess.pad_to_multiple(np.asarray(image, dtype=np.float32), divisor)
    out = np.empty((image.shape[0], h, w), dtype=np.float32)
    flips = [()] + ([(2,), (3,), (2, 3)] if tta else [])
    for start in range(0, padded.shape[0], batch_size):
        batch = preprocess.with_context(padded, np.arange(start, min(start + batch_size, padded.shape[0])), context)
        acc = None
        for axes in flips:
            x = np.ascontiguousarray(np.flip(batch, axes) if axes else batch)
            y = session.run(None, {input_name: x})[0].astype(np.float32, copy=False)
            y = np.flip(y, axes) if axes else y
            y = y if return_logits else expit(y)
            acc = y if acc is None else acc + y
        out[start:start + batch_size] = (acc / len(flips))[:, 0, :h, :w]
    return out


def predict_case(predictor: OnnxPredictor, channels: list[np.ndarray], affine: np.ndarray, *,
                 tta: bool = False, postprocessing: dict | None = None, where: object = None,
                 notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Segment one scan: (uint8 mask, float32 probabilities) on the scan's grid, as ``inference.predict_case``."""
    return preprocess.segment(lambda image: predictor.run_volume(image, tta=tta), channels, affine, predictor.plan,
                              {**predictor.postprocessing, **(postprocessing or {})}, where=where, notes=notes)
