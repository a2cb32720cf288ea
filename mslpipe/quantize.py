"""int8 ONNX models for small devices: static post-training quantization with ONNX Runtime.

`mslpipe export --precision int8` first exports the float model (:mod:`mslpipe.export`), then:

1. **calibration**: up to ``CALIBRATION_SLICES`` brain slices, spread evenly over up to ``MAX_VOLUMES``
   preprocessed scans (the fold's own training scans, or scans given with ``--calibration``), run through
   the float model to record every activation's range (ONNX Runtime's MinMax calibrator);
2. **quantization**: ``onnxruntime.quantization.quantize_static`` in QDQ format, int8 weights per output
   channel, uint8 activations, every operator it supports except normalisation layers (nnU-Net's instance
   norm; batch norm is folded into the convolutions at export). Quantizing only the convolutions ran slower
   on leaky_unet in a one-off check (the other operators then need conversions around them). The first
   convolution (which reads the z-scored intensities) and the last one (which writes the logits that are
   thresholded) stay in float: in a one-off check on fold 0 of the real MS scans, quantizing the first
   convolution cut the int8 masks' agreement with the float ones from about 0.97 to 0.85 Dice;
3. **check**: the int8 and the float model segment other brain slices of the same scans (up to
   ``CHECK_SLICES``, none of them used for calibration); the export is refused when the two masks agree less
   than ``MIN_AGREEMENT`` (Dice over all checked voxels). The agreement is stored in the model's description.

The quantization works on ONNX files and numpy arrays; only reading preprocessed training scans imports
:mod:`mslpipe.data_loading` (and torch with it).
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from scipy.special import expit

from mslpipe import onnx_inference, preprocess
from mslpipe.errors import MslpipeError
from mslpipe.plans import Plan

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "int8")
CALIBRATION_SLICES = 64
CHECK_SLICES = 256
MAX_VOLUMES = 8
BATCH = 8
MIN_AGREEMENT = 0.9  # Dice between the int8 and the float masks on the check slices
MIN_FOREGROUND = 50  # voxels: below this in both masks, the agreement is not measurable (no refusal)
METHOD = ("static post-training quantization (ONNX Runtime, QDQ), MinMax calibration, int8 weights per output "
          "channel, uint8 activations; first and last convolution and normalisation layers in float")
NORMS = ("BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization")


# ---------------------------------------------------------------------------- calibration data
def spread(n_items: int, n: int) -> np.ndarray:
    """At most ``n`` indices into ``range(n_items)``, evenly spread, first and last included."""
    if n_items <= n:
        return np.arange(n_items)
    return np.unique(np.round(np.linspace(0, n_items - 1, n)).astype(int))


def brain_slices(volume: np.ndarray) -> np.ndarray:
    """Indices of the slices of an S×C×H×W preprocessed volume that hold brain (anything non-zero)."""
    return np.flatnonzero(np.abs(volume).reshape(volume.shape[0], -1).max(axis=1) > 0)


def split_slices(volumes: list[np.ndarray], n_calibration: int = CALIBRATION_SLICES,
                 n_check: int = CHECK_SLICES) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """(volume, slice) pairs for calibration and, disjoint from them, for the check: brain slices only; at
    most half of them for calibration, so that the check always has slices of its own."""
    pairs = [(v, int(s)) for v, vol in enumerate(volumes) for s in brain_slices(vol)]
    if len(pairs) < 2:
        raise MslpipeError(f"calibration scans hold {len(pairs)} brain slice(s): too few to calibrate and check "
                           "an int8 model")
    calibration = [pairs[i] for i in spread(len(pairs), min(n_calibration, len(pairs) // 2))]
    taken = set(calibration)
    rest = [p for p in pairs if p not in taken]
    return calibration, [rest[i] for i in spread(len(rest), n_check)]


def batches(volumes: list[np.ndarray], pairs: list[tuple[int, int]], *, divisor: int, context: int,
            batch_size: int = BATCH) -> list[np.ndarray]:
    """Network inputs (N×C'×H×W, neighbouring slices as channels) for the pairs, zero-padded to one common
    H×W that is a multiple of ``divisor`` (zero is the background of preprocessed scans)."""
    h = max(int(np.ceil(v.shape[2] / divisor)) * divisor for v in volumes)
    w = max(int(np.ceil(v.shape[3] / divisor)) * divisor for v in volumes)
    slices = []
    for v in sorted({v for v, _ in pairs}):
        idx = np.array([s for u, s in pairs if u == v])
        x = preprocess.with_context(volumes[v], idx, context)
        slices.append(np.pad(x, ((0, 0), (0, 0), (0, h - x.shape[2]), (0, w - x.shape[3]))))
    stacked = np.concatenate(slices).astype(np.float32, copy=False)
    return [np.ascontiguousarray(stacked[i:i + batch_size]) for i in range(0, len(stacked), batch_size)]


def volumes_from_preprocessed(pre_dir: Path, cases: list[str], plan: Plan) -> list[np.ndarray]:
    """Up to ``MAX_VOLUMES`` of the given preprocessed cases, refusing data preprocessed under another plan."""
    from mslpipe import data_loading

    if not cases:
        raise MslpipeError("no training scans to calibrate with: give --calibration SCANS")
    want = plan.preprocessing_hash()
    out = []
    for i in spread(len(cases), MAX_VOLUMES):
        image, _, props = data_loading.load_case_arrays(pre_dir, cases[i])
        if props.get("preprocessing_hash") != want:
            raise MslpipeError(f"{cases[i]} was preprocessed with other settings than the model's plan: plan the "
                               "dataset again, or give --calibration SCANS", pre_dir)
        out.append(image)
    return out


# ---------------------------------------------------------------------------- quantization
def float_nodes(model_path: Path) -> list[str]:
    """The nodes kept in float: the first and the last convolution of the graph, and normalisation layers."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph
    convs = [n.name for n in graph.node if n.op_type == "Conv"]
    return sorted({*(convs[:1] + convs[-1:]), *(n.name for n in graph.node if n.op_type in NORMS)})


class _Reader:
    """ONNX Runtime's CalibrationDataReader protocol over a list of batches."""

    def __init__(self, input_name: str, data: list[np.ndarray]):
        self._it = iter([{input_name: x} for x in data])

    def get_next(self):
        return next(self._it, None)

    def __len__(self):  # pragma: no cover - part of the protocol, unused by the MinMax calibrator
        return 0


def agreement(float_session: Any, int8_path: Path, data: list[np.ndarray], threshold: float) -> dict[str, Any]:
    """Masks of both models on the same inputs: Dice over all voxels, and how far the probabilities moved."""
    sessions = [float_session, onnx_inference.open_session(int8_path)]
    name = float_session.get_inputs()[0].name
    inter = fg_float = fg_int8 = differ = voxels = 0
    worst = 0.0
    for x in data:
        p_float, p_int8 = (expit(s.run(None, {name: x})[0].astype(np.float32)) for s in sessions)
        m_float, m_int8 = p_float >= threshold, p_int8 >= threshold
        inter += int((m_float & m_int8).sum())
        fg_float, fg_int8 = fg_float + int(m_float.sum()), fg_int8 + int(m_int8.sum())
        differ += int((m_float != m_int8).sum())
        voxels += m_float.size
        worst = max(worst, float(np.abs(p_float - p_int8).max()))
    measurable = max(fg_float, fg_int8) >= MIN_FOREGROUND
    return {"mask_dice": 2 * inter / (fg_float + fg_int8) if measurable else None,
            "slices": int(sum(len(x) for x in data)), "float_foreground_voxels": fg_float,
            "int8_foreground_voxels": fg_int8, "voxels_differing": differ, "voxels": voxels,
            "max_abs_probability_diff": worst}


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantizer logs advice and per-tensor notes on the root logger: keep errors only."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(None):
            yield
    finally:
        root.setLevel(level)


def quantize(float_path: Path, out: Path, volumes: list[np.ndarray], *, divisor: int, context: int,
             threshold: float = 0.5, min_agreement: float = MIN_AGREEMENT, source: str = "",
             where: object = None) -> dict[str, Any]:
    """Write the int8 model of ``float_path`` to ``out`` (calibrated and checked on ``volumes``, S×C×H×W
    preprocessed scans); returns its description. ``out`` is only written when the check passes; errors
    name ``where`` (default: ``out``)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration, check = split_slices(volumes)
    calibration_data = batches(volumes, calibration, divisor=divisor, context=context)
    keep_float = float_nodes(float_path)
    float_session = onnx_inference.open_session(float_path)
    input_name = float_session.get_inputs()[0].name
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix=".mslpipe-int8-", dir=out.parent) as tmp:  # beside out: renamed at the end
        prepared = Path(tmp) / "prepared.onnx"
        quantized = Path(tmp) / "int8.onnx"
        # shape inference and graph optimisation (e.g. batch norm folded into convolutions); ONNX Runtime's
        # symbolic shape inference cannot follow the dynamic height and width, so it is skipped
        with _quiet():
            quant_pre_process(str(float_path), str(prepared), skip_symbolic_shape=True)
            quantize_static(str(prepared), str(quantized), _Reader(input_name, calibration_data),
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                            nodes_to_exclude=keep_float)
        checked = agreement(float_session, quantized, batches(volumes, check, divisor=divisor, context=context),
                            threshold)
        dice = checked["mask_dice"]
        if dice is not None and dice < min_agreement:
            raise MslpipeError(f"the int8 model's masks agree with the float model's only at Dice {dice:.3f} "
                               f"(< {min_agreement}) on {checked['slices']} calibration-scan slices: export "
                               "--precision fp32 instead", where if where is not None else out)
        if dice is None:
            log.warning("int8 check: the float model marks fewer than %d voxels on %d slices, so the masks' "
                        "agreement is not measurable", MIN_FOREGROUND, checked["slices"])
        os.replace(quantized, out)
    return {"precision": "int8", "method": METHOD, "float_nodes": keep_float,
            "calibration": {"source": source, "volumes": len(volumes), "slices": len(calibration)},
            "check": {**checked, "min_agreement": min_agreement,
                      "what": "int8 against float masks at the threshold, on brain slices not used for calibration"}}
