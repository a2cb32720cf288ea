"""The one inference path: used by training's validation and by `mslpipe predict`.

A volume goes through :func:`mslpipe.preprocess.preprocess_volume`, every slice through the
network in large batches (bf16 and channels_last on CUDA), the probabilities of an ensemble
(and of mirrored inputs with TTA) are averaged, and the result is mapped back onto the scan's grid.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe import architectures, checkpoints, preprocess
from mslpipe.errors import MslpipeError
from mslpipe.plans import CPU_INFERENCE_BATCH, Plan

log = logging.getLogger(__name__)


@dataclass
class Predictor:
    """One or more trained networks (a fold ensemble) and the plan they were trained with."""

    models: list[Any]
    plan: Plan
    device: str
    divisor: int
    sources: list[str]

    def predict_case(self, channels: list[np.ndarray], affine: np.ndarray, **kwargs) -> tuple[np.ndarray, np.ndarray]:
        return predict_case(self, channels, affine, **kwargs)

    def run_volume(self, image: np.ndarray, tta: bool = False) -> np.ndarray:
        """S×C×H×W preprocessed volume → S×H×W probabilities (:func:`predict_volume` with the plan's settings)."""
        return predict_volume(self.models, image, divisor=self.divisor, device=self.device,
                              batch_size=self.plan.inference_batch_size, tta=tta, context=self.plan.context_slices)

    @property
    def postprocessing(self) -> dict:
        return dict(self.plan.postprocessing)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise MslpipeError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda"):
        raise MslpipeError(f"--device must be auto, cpu or cuda, not {device!r}")
    return device


def prepare_model(model, device: str):
    """Move a model to the device in the layout it runs fastest in there (:func:`architectures.memory_format`:
    channels_last on CUDA and for networks that say so on a CPU), whatever layout its weights were saved in."""
    return model.to(device, memory_format=architectures.memory_format(model, device))


def load_predictor(paths: list[Path], device: str = "auto", compile: bool = False,
                   timings: dict[str, float] | None = None) -> Predictor:
    """Build the networks stored in checkpoints; all must share one plan's preprocessing. ``timings``, when a
    dict, receives the seconds of each part: reading the checkpoints into networks on the CPU, and the device
    (choosing it, starting it, moving the weights there)."""
    import torch

    t0 = time.perf_counter()
    if not paths:
        raise MslpipeError("no checkpoints to predict with: train a fold first or pass --checkpoint")
    models, plan = [], None
    for path in paths:
        payload = checkpoints.load(path)
        meta = payload["meta"]
        this_plan = Plan.from_dict(meta["plan"], where=path)
        if plan is not None and this_plan.preprocessing_hash() != plan.preprocessing_hash():
            raise MslpipeError("checkpoint was trained with different preprocessing than the others", path)
        plan = plan or this_plan
        # built without memory or initialisation (the checkpoint's tensors replace every one): a full-width
        # network's random initialisation alone costs a third of a second per fold on a CPU
        with torch.device("meta"):
            model = architectures.build(this_plan.architecture, in_channels=this_plan.input_channels,
                                        **this_plan.arch_kwargs)
        try:
            model.load_state_dict(payload["model"], assign=True)
        except RuntimeError as exc:
            raise MslpipeError(f"weights do not fit architecture {this_plan.architecture} "
                               f"({str(exc).splitlines()[0]})", path) from exc
        models.append(model)
    t1 = time.perf_counter()
    device = pick_device(device)
    models = [prepare_model(model, device).eval() for model in models]
    if compile:
        models = [torch.compile(model) for model in models]
    if timings is not None:
        timings.update({"checkpoints": t1 - t0, "device": time.perf_counter() - t1})
    divisor = architectures.required_divisor(plan.architecture, **plan.arch_kwargs)
    return Predictor(models, plan, device, divisor, [str(p) for p in paths])


def predict_volume(models: list[Any], image: np.ndarray, *, divisor: int, device: str,
                   batch_size: int = 64, tta: bool = False, return_logits: bool = False,
                   context: int = 0) -> np.ndarray:
    """Run every slice of an S×C×H×W volume through the networks (each slice with ``context``
    neighbours on either side as extra channels, see :func:`mslpipe.preprocess.with_context`).

    Returns S×H×W foreground probabilities averaged over models (and mirrored inputs when
    ``tta``), or with ``return_logits`` the logits of a single model without TTA. On a CPU at most
    ``CPU_INFERENCE_BATCH`` slices go through at once (a GPU plan's batch would exhaust the memory).
    """
    import torch

    if device == "cpu":
        batch_size = min(batch_size, CPU_INFERENCE_BATCH)
    if return_logits and (len(models) != 1 or tta):
        raise ValueError("return_logits needs exactly one model and no TTA")
    padded, (h, w) = preprocess.pad_to_multiple(image, divisor)
    flips = [()] + ([(2,), (3,), (2, 3)] if tta else [])
    use_amp = device == "cuda"
    layout = architectures.memory_format(models[0], device)  # one plan, one architecture for all of them
    with torch.inference_mode(), torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=use_amp):
        # the volume goes to the device once (a few MB); the neighbour stacks are built there
        volume = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32)).to(device)
        out = torch.empty((image.shape[0], h, w), dtype=torch.float32, device=device)
        for start in range(0, padded.shape[0], batch_size):
            index = np.arange(start, min(start + batch_size, padded.shape[0]))
            batch = preprocess.with_context(volume, index, context)
            batch = batch.contiguous(memory_format=layout)
            acc = None
            for model in models:
                for dims in flips:
                    x = torch.flip(batch, dims) if dims else batch
                    y = model(x).float()
                    y = torch.flip(y, dims) if dims else y
                    y = y if return_logits else torch.sigmoid(y)
                    acc = y if acc is None else acc + y
            acc = acc / (len(models) * len(flips))
            out[start:start + batch_size] = acc[:, 0, :h, :w]
    return out.cpu().numpy()


def predict_case(predictor: Predictor, channels: list[np.ndarray], affine: np.ndarray, *,
                 tta: bool = False, postprocessing: dict | None = None, where: object = None,
                 notes: list[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Segment one scan: returns (uint8 mask, float32 probabilities), both on the scan's grid; quality
    warnings go to ``notes`` (see ``preprocess.segment``)."""
    return preprocess.segment(lambda image: predictor.run_volume(image, tta=tta), channels, affine, predictor.plan,
                              {**predictor.postprocessing, **(postprocessing or {})}, where=where, notes=notes)
