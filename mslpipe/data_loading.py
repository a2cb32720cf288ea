"""Reading preprocessed cases and streaming augmented 2D training batches.

The preprocessed folder holds, per case, ``<case>.npy`` (float32, ``(S, C, H, W)``: S slices
along the plan's slice axis), ``<case>_seg.npy`` (float32 ``(S, H, W)`` in [0, 1]) and
``<case>.json`` (properties, with ``fg_slices``: the slices that hold lesion).

Training batches (:func:`make_train_loader`) are built nnU-Net style:

* at least ``ceil(oversample_foreground * batch_size)`` samples of each batch are slices
  from ``fg_slices`` (case first, uniformly among cases with lesion, then a slice: uniformly, or with
  ``foreground_sampling`` "lesion" a lesion uniformly and then one of its slices, see
  :func:`lesion_slice_weights`); the rest pick a case uniformly, then a slice uniformly;
* each slice is cropped or zero-padded to ``plan.patch_size``: a case smaller than the patch
  sits at a random offset in a zero canvas; a larger one is cropped at random, or, for a
  foreground sample, centred on a random lesion voxel with jitter of up to a quarter patch,
  which always keeps that voxel inside the crop;
* augmentation (:func:`mslpipe.augmentation.build_augmentation`) uses MONAI dictionary transforms.

Determinism: every batch is seeded from ``(seed, epoch, batch index)`` alone, so a loader
gives the same batches whatever ``num_workers`` is, and worker ``w`` of ``n`` makes the
batches ``w, w + n, ...`` (the DataLoader hands them back in order). The epoch is counted by
the dataset's own ``__iter__`` calls, which works in the main process and in persistent
workers alike.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from mslpipe import preprocess
from mslpipe.errors import MslpipeError
from mslpipe.io import read_json
from mslpipe.metrics import label_lesions
from mslpipe.plans import Plan

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------- reading cases
def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    if not path.is_file():
        raise MslpipeError("file not found" if not path.exists() else "not a regular file", path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except MemoryError as exc:
        raise MslpipeError("array too large to load", path) from exc
    except Exception as exc:  # numpy raises ValueError, OSError, EOFError... on corrupt files
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise MslpipeError(f"cannot read as a .npy array ({reason})", path) from exc


def _props(pre_dir: Path, case: str) -> dict:
    """A preprocessed case's properties; a case never preprocessed points at `plan` (an interrupted one resumes)."""
    path = pre_dir / f"{case}.json"
    if not path.exists():
        raise MslpipeError("this case was not preprocessed (an interrupted `mslpipe plan`? run it again: it "
                           "preprocesses only what is missing)", path)
    return read_json(path)


def _check_case(pre_dir: Path, case: str, image: np.ndarray, seg: np.ndarray, props) -> None:
    img_path, seg_path = pre_dir / f"{case}.npy", pre_dir / f"{case}_seg.npy"
    if image.ndim != 4 or image.dtype.kind != "f":
        raise MslpipeError(f"expected a float (slices, channels, H, W) array, got {image.dtype} "
                           f"with shape {image.shape}", img_path)
    if seg.shape != image.shape[:1] + image.shape[2:] or seg.dtype.kind not in "fiub":
        raise MslpipeError(f"segmentation shape {seg.shape} ({seg.dtype}) does not match the image's "
                           f"{image.shape}", seg_path)
    json_path = pre_dir / f"{case}.json"
    if not isinstance(props, dict):
        raise MslpipeError("properties are not a JSON object", json_path)
    fg = props.get("fg_slices")
    if not isinstance(fg, list) or not all(isinstance(s, int) and 0 <= s < image.shape[0] for s in fg):
        raise MslpipeError(f"'fg_slices' must be a list of slice indices in [0, {image.shape[0]})", json_path)


def open_case(pre_dir: str | os.PathLike, case: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Open a preprocessed case as read-only memory maps: ``(image, seg, properties)``.

    ``image`` is ``(S, C, H, W)``, ``seg`` is ``(S, H, W)``. A missing, corrupt or
    inconsistent file raises :class:`MslpipeError` naming that file.
    """
    pre_dir = Path(pre_dir)
    props = _props(pre_dir, case)
    image = _load_npy(pre_dir / f"{case}.npy", mmap=True)
    seg = _load_npy(pre_dir / f"{case}_seg.npy", mmap=True)
    _check_case(pre_dir, case, image, seg, props)
    return image, seg, props


def load_case_arrays(pre_dir: str | os.PathLike, case: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Like :func:`open_case` but fully loaded into memory as float32 (for validation)."""
    pre_dir = Path(pre_dir)
    props = _props(pre_dir, case)
    image = _load_npy(pre_dir / f"{case}.npy", mmap=False)
    seg = _load_npy(pre_dir / f"{case}_seg.npy", mmap=False)
    _check_case(pre_dir, case, image, seg, props)
    return image.astype(np.float32, copy=False), seg.astype(np.float32, copy=False), props


# ---------------------------------------------------------------------------- sampling
def _place(size: int, patch: int, rng: np.random.Generator, centre: int | None) -> tuple[int, int, int]:
    """Return (source start, destination start, length) along one axis."""
    if size <= patch:
        return 0, int(rng.integers(0, patch - size + 1)), size
    if centre is None:
        start = int(rng.integers(0, size - patch + 1))
    else:
        jitter = patch // 4
        start = centre - patch // 2 + int(rng.integers(-jitter, jitter + 1))
        start = min(max(start, 0), size - patch)
    return start, 0, patch


def lesion_slice_weights(seg: np.ndarray, fg_slices: np.ndarray) -> np.ndarray:
    """The chance of each of ``fg_slices`` when a lesion is drawn first, uniformly, then one of its slices.

    Lesions are the 26-connected components of ``seg > 0`` (S×H×W); a component spans a run of slices, each of
    which gets ``1 / (number of lesions · slices it spans)``. Summed over the slices, every lesion weighs the same,
    whatever its size.
    """
    labels, n = label_lesions(np.asarray(seg) > 0)
    weight = np.zeros(labels.shape[0], dtype=np.float64)
    for box in ndimage.find_objects(labels):
        weight[box[0]] += 1.0 / (box[0].stop - box[0].start)
    p = weight[fg_slices]
    if n == 0 or p.sum() <= 0:  # fg_slices and the mask disagree: fall back to uniform
        return np.full(len(fg_slices), 1.0 / max(len(fg_slices), 1))
    return p / p.sum()


class SliceSampler(IterableDataset):
    """Yields ``batches`` whole batches per epoch: ``{"image": (B,C,Hp,Wp), "label": (B,1,Hp,Wp)}``.

    Memory maps are opened lazily in whichever process draws samples, never pickled.
    """

    def __init__(self, pre_dir: str | os.PathLike, cases: Sequence[str], plan: Plan, *, batches: int,
                 seed: int, start_epoch: int = 0):
        super().__init__()
        if not cases:
            raise MslpipeError("no training cases given", pre_dir)
        if batches < 1:
            raise MslpipeError(f"batches must be positive, got {batches}")
        self.pre_dir = Path(pre_dir)
        self.cases = list(cases)
        self.patch = tuple(int(p) for p in plan.patch_size)
        self.batch_size = int(plan.batch_size)
        self.n_fg = math.ceil(plan.oversample_foreground * self.batch_size - 1e-9)
        self.aug = plan.augmentation
        self.batches = int(batches)
        self.seed = int(seed) & 0xFFFF_FFFF_FFFF_FFFF
        self.epoch = int(start_epoch)
        self.n_slices: list[int] = []
        self.fg_slices: list[np.ndarray] = []
        channels = len(plan.channels)
        subjects = []
        # per case, the chance of each of its lesion slices in a foreground draw (None: uniform)
        self.fg_slice_p: list[np.ndarray | None] = []
        for case in self.cases:
            image, seg, props = open_case(self.pre_dir, case)
            subjects.append(str(props.get("subject", case)))
            if image.shape[1] != channels:
                raise MslpipeError(f"{image.shape[1]} channels but the plan has {channels} "
                                   f"({plan.channels}): preprocess again", self.pre_dir / f"{case}.npy")
            self.n_slices.append(int(image.shape[0]))
            self.fg_slices.append(np.asarray(sorted(set(props["fg_slices"])), dtype=np.int64))
            lesion_draws = plan.foreground_sampling == "lesion" and self.fg_slices[-1].size
            self.fg_slice_p.append(lesion_slice_weights(seg, self.fg_slices[-1]) if lesion_draws else None)
        self.context = int(plan.context_slices)
        self.channels = plan.input_channels
        self.fg_cases = np.asarray([i for i, f in enumerate(self.fg_slices) if f.size], dtype=np.int64)
        # Subjects weigh equally, not scans: a patient with five time points must not dominate training.
        per_subject = {s: subjects.count(s) for s in subjects}
        weights = np.asarray([1.0 / per_subject[s] for s in subjects])
        self.case_p = weights / weights.sum()
        self.fg_p = weights[self.fg_cases] / weights[self.fg_cases].sum() if self.fg_cases.size else None
        if self.n_fg and not self.fg_cases.size:
            log.warning("no training case has lesion slices: foreground oversampling is off")
        if self.aug.enabled:
            from mslpipe import augmentation  # MONAI's transforms: imported when used

            augmentation.build_augmentation(self.aug)  # fail early on a bad plan, in the main process
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._transform = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_arrays"], state["_transform"] = {}, None
        return state

    def __len__(self) -> int:
        return self.batches

    def _case(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._arrays:
            image, seg, _ = open_case(self.pre_dir, self.cases[i])
            self._arrays[i] = (image, seg)
        return self._arrays[i]

    def _draw(self, rng: np.random.Generator, foreground: bool, image_out: np.ndarray,
              label_out: np.ndarray) -> None:
        """Fill one zeroed (C, Hp, Wp) / (Hp, Wp) pair with a cropped or padded slice."""
        if foreground:
            ci = int(rng.choice(self.fg_cases, p=self.fg_p))
            p = self.fg_slice_p[ci]
            s = int(self.fg_slices[ci][rng.integers(len(self.fg_slices[ci])) if p is None
                                       else rng.choice(len(p), p=p)])
        else:
            ci = int(rng.choice(len(self.cases), p=self.case_p))
            s = int(rng.integers(self.n_slices[ci]))
        image, seg = self._case(ci)
        _, _, h, w = image.shape
        centre: tuple[int | None, int | None] = (None, None)
        if foreground and (h > self.patch[0] or w > self.patch[1]):
            lab = np.asarray(seg[s])
            ys, xs = np.nonzero(lab > 0.5)
            if ys.size == 0:
                ys, xs = np.nonzero(lab > 0)
            if ys.size:
                k = int(rng.integers(ys.size))
                centre = (int(ys[k]), int(xs[k]))
            else:
                log.debug("case %s slice %d is listed in fg_slices but has no lesion", self.cases[ci], s)
        y0, dy, hh = _place(h, self.patch[0], rng, centre[0])
        x0, dx, ww = _place(w, self.patch[1], rng, centre[1])
        if self.context:
            image_out[:, dy:dy + hh, dx:dx + ww] = preprocess.with_context(
                image[:, :, y0:y0 + hh, x0:x0 + ww], np.asarray([s]), self.context)[0]
        else:
            image_out[:, dy:dy + hh, dx:dx + ww] = image[s, :, y0:y0 + hh, x0:x0 + ww]
        label_out[dy:dy + hh, dx:dx + ww] = seg[s, y0:y0 + hh, x0:x0 + ww]

    def make_batch(self, epoch: int, index: int) -> dict[str, torch.Tensor]:
        """Batch ``index`` of ``epoch``: a pure function of (seed, epoch, index) and the data."""
        rng = np.random.default_rng([self.seed, int(epoch), int(index)])
        b = self.batch_size
        images = np.zeros((b, self.channels, *self.patch), dtype=np.float32)
        labels = np.zeros((b, 1, *self.patch), dtype=np.float32)
        n_fg = self.n_fg if self.fg_cases.size else 0
        for i in range(b):
            self._draw(rng, i < n_fg, images[i], labels[i, 0])
        image_t, label_t = torch.from_numpy(images), torch.from_numpy(labels)
        if self.aug.enabled:
            self._augment(image_t, label_t, int(rng.integers(2**31)))
        return {"image": image_t, "label": label_t}

    def _augment(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        from monai.data import get_track_meta, set_track_meta

        if self._transform is None:
            from mslpipe import augmentation

            self._transform = augmentation.build_augmentation(self.aug)
        self._transform.set_random_state(seed=seed)
        track, threads = get_track_meta(), torch.get_num_threads()
        set_track_meta(False)  # plain tensors: no MetaTensor bookkeeping per sample
        torch.set_num_threads(1)  # small per-sample ops: intra-op threads only add overhead
        try:
            for i in range(images.shape[0]):
                out = self._transform({"image": images[i], "label": labels[i]})
                images[i] = torch.as_tensor(out["image"])
                labels[i] = torch.as_tensor(out["label"])
        finally:
            set_track_meta(track)
            torch.set_num_threads(threads)
        labels.clamp_(0.0, 1.0)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        epoch = self.epoch
        self.epoch += 1  # this object's copy: the main process's or a persistent worker's
        info = get_worker_info()
        worker, n_workers = (0, 1) if info is None else (info.id, info.num_workers)
        for index in range(worker, self.batches, n_workers):
            yield self.make_batch(epoch, index)


# ---------------------------------------------------------------------------- loader
def _available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def resolve_num_workers(requested: int | None, plan: Plan, batches: int) -> int:
    """``requested`` (default ``plan.num_workers``) capped at CPUs - 1 and at ``batches``."""
    n = plan.num_workers if requested is None else int(requested)
    if n < 0:
        raise MslpipeError(f"num_workers must be 0 or more, got {n}")
    return max(0, min(n, _available_cpus() - 1, batches))


def make_train_loader(pre_dir: str | os.PathLike, cases: Sequence[str], plan: Plan, *, batches: int,
                      seed: int, num_workers: int | None = None, device_hint: str = "cpu",
                      start_epoch: int = 0) -> DataLoader:
    """An iterable of ``batches`` training batches per pass (one pass = one epoch).

    Each item is ``{"image": float32 (B, C, Hp, Wp), "label": float32 (B, 1, Hp, Wp)}`` with
    ``(Hp, Wp) = plan.patch_size`` and ``B = plan.batch_size``. Workers build whole batches
    (``batch_size=None``) and stay alive between epochs; ``start_epoch`` sets the first epoch's
    seed when resuming.
    """
    dataset = SliceSampler(pre_dir, cases, plan, batches=batches, seed=seed, start_epoch=start_epoch)
    workers = resolve_num_workers(num_workers, plan, batches)
    pin = str(device_hint).startswith("cuda") and torch.cuda.is_available()
    extra = {"persistent_workers": True, "prefetch_factor": 2} if workers else {}
    log.info("training loader: %d cases (%d with lesion), %d batches of %d, %d workers, augmentation %s",
             len(dataset.cases), len(dataset.fg_cases), batches, dataset.batch_size, workers,
             "on" if plan.augmentation.enabled else "off")
    return DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=pin, **extra)
