"""Checkpoints that hold only tensors and JSON-able metadata, saved atomically, loaded safely.

``torch.load(path, weights_only=True)`` loads every checkpoint mslpipe writes; a file that needs
pickled Python objects is refused, so a model file can never run hidden code.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_path

log = logging.getLogger(__name__)

FORMAT = 1


def save(path: str | os.PathLike, payload: dict[str, Any]) -> Path:
    import torch

    payload = {"format": FORMAT, **payload}
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load(path: str | os.PathLike, map_location: str = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; every failure is one clear MslpipeError."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise MslpipeError("checkpoint not found", path)
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch raises UnpicklingError both for pickled objects (a GLOBAL not allowlisted) and for
        # bytes that are no pickle at all (e.g. "Unsupported operand"): only the first needs objects
        if not any(key in str(exc) for key in ("GLOBAL", "allowlisted", "add_safe_globals")):
            raise MslpipeError("corrupt or unreadable checkpoint (not a PyTorch checkpoint file)",
                               path) from exc
        raise MslpipeError("refusing to load: the checkpoint needs pickled Python objects "
                           "(only tensors and plain data are accepted, weights_only=True)", path) from exc
    except Exception as exc:  # truncated zip, wrong magic number, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MslpipeError(f"corrupt or unreadable checkpoint ({reason[:200]})", path) from exc
    if not isinstance(payload, dict) or "model" not in payload or "meta" not in payload:
        raise MslpipeError("not an mslpipe checkpoint (no 'model' and 'meta')", path)
    if payload.get("format", 0) > FORMAT:
        raise MslpipeError(f"checkpoint format {payload['format']} is newer than this mslpipe's {FORMAT}",
                           path)
    return payload


def rng_state() -> dict[str, Any]:
    """All random states as tensors and plain data (weights_only-safe)."""
    import torch

    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached), "name": name},
        "python": _py_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), state["python"][2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _py_state_to_list(state):
    version, internal, gauss = state
    return [version, list(internal), gauss]
