"""`mslpipe plan`: verify the data, fingerprint it, plan the pipeline, split by subject, preprocess.

Verification runs over every case before anything is written, so bad input leaves no files.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from mslpipe import brainmask, preprocess
from mslpipe.datasets import Case, discover
from mslpipe.errors import MslpipeError
from mslpipe.io import read_json, write_json
from mslpipe.plans import CPU_INFERENCE_BATCH, Plan, Workdirs, save_plan

log = logging.getLogger(__name__)

# 2.5D by default: each slice with one neighbour on either side (3 input channels, as the study's replicated
# grey slices had). Over two seeds of the real-data CPU cross-validation (bench/RESULTS.md) it gave a higher
# mean lesion F1 (0.433 against 0.368) and ISBI score (0.596 against 0.527) than one slice, mean Dice level.
DEFAULT_CONTEXT_SLICES = 1
# nnU-Net's default share of samples that simulate a coarser scanner (down by a zoom in [0.5, 1], back up):
# mslpipe will meet scans from scanners it never saw, many of them at coarser resolutions than ISBI's. GPU plans
# only: their schedule is nnU-Net-like; in a CPU plan's few minutes it cost Dice on scans as acquired (the demo,
# and both seeds in bench/RESULTS.md "Robustness to coarser scans" as rerun at f3b944d).
DEFAULT_P_LOW_RES = 0.25
# N4 bias-field correction before normalising, 3 fitting levels: scans from other scanners may come without it.
# Chosen by a rule set before the run (bench/RESULTS.md "N4 bias-field correction"): over 12 real scan runs it cost
# 0.002 of volume Dice as acquired and gained 0.06 under a ±20% ramp and 0.25 under ±40% (0.14 before a fix to the
# benchmark's shading). Costs a few seconds of CPU per scan; `plan --n4 0` turns it off.
DEFAULT_N4_LEVELS = 3
# Median/IQR normalisation: mslpipe is for scans from scanners it never saw, and trained on one source of the real
# data and scored on the other it was ahead of z-score in 3 of 4 seeds (pooled Dice 0.483 against 0.437, lesion F1
# 0.371 against 0.312; bench/RESULTS.md "Another scanner"), by a rule set before the last two seeds ran.
# Plans written before it say z-score, and keep it.
DEFAULT_NORMALIZATION = "brain_percentile_median_iqr"
# BatchNorm statistics estimated again for the final weights on 50 training batches ("precise BN"). By a rule set
# before the run (bench/RESULTS.md "BatchNorm statistics estimated again", 3 seeds, 18 real scan runs, CPU plan):
# volume Dice 0.481 against 0.449 with the running averages, ahead in Dice on 14 of 18, lesion F1 level (0.406
# against 0.405; 0.433 in the first run, whose 50 batches were drawn otherwise); 8 s per fold on 2 CPU cores.
# Plans written before it keep the running averages.
DEFAULT_BN_RECALIBRATION_BATCHES = 50


# ---------------------------------------------------------------------------- verify + fingerprint
def fingerprint_case(case: Case) -> dict[str, Any]:
    """Load and verify one case; return its fingerprint. Raises MslpipeError on bad input."""
    channels, affine, masks = preprocess.load_case(case)
    first = next(iter(case.images.values()))
    image = channels[0]
    ornt = preprocess.canonical_ornt(affine)
    canon = preprocess.to_canonical(image, ornt)
    brain = brainmask.brain_mask(canon)
    if not brain.any():
        raise MslpipeError("image is empty (all zero, one value, or no voxel above its background)", first)
    box = brainmask.bounding_box(brain, 0)
    values = canon[brain]
    p_lo, p_hi = np.percentile(values, [0.5, 99.5])
    if p_hi - p_lo <= 0:
        raise MslpipeError("image has no contrast inside the brain (constant intensity)", first)
    import nibabel as nib

    fp: dict[str, Any] = {
        "case": case.id,
        "subject": case.subject,
        "timepoint": case.timepoint,
        "test_only": case.test_only,
        "shape": list(image.shape),
        "spacing": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)],
        "spacing_canonical": [float(s) for s in np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]],
        "orientation": "".join(nib.aff2axcodes(affine)),
        "brain_bbox_canonical": box,
        "brain_bbox_size": [b - a for a, b in box],
        "brain_ml": float(brain.sum() * np.prod(np.linalg.norm(affine[:3, :3], axis=0)) / 1000),
        "intensity": {
            "p00_5": float(p_lo), "p99_5": float(p_hi),
            "mean": float(values.mean()), "std": float(values.std()),
        },
        "n_raters": len(masks),
    }
    structure = ndimage.generate_binary_structure(3, 3)
    fp["lesion_voxels"] = [int(m.sum()) for m in masks]
    fp["lesion_count"] = [int(ndimage.label(m, structure)[1]) for m in masks]
    return fp


def verify_and_fingerprint(cases: list[Case], progress: Callable[[str], None] | None = None,
                           root: Path | None = None) -> dict:
    """Check every case and take the dataset's fingerprint; ``root`` names the folder in dataset-wide errors."""
    per_case = []
    for case in cases:
        if not case.test_only and not case.masks:
            raise MslpipeError(f"training case {case.id} has no mask", next(iter(case.images.values())))
        per_case.append(fingerprint_case(case))
        if progress:
            progress(case.id)
    labelled = [c for c in per_case if not c["test_only"]]
    if not labelled:
        raise MslpipeError("no labelled (training) cases found: every case is a test case without masks", root)
    counts = [c["n_raters"] for c in labelled]
    raters = set(counts)
    if len(raters) > 1:
        usual = max(sorted(raters), key=counts.count)
        odd = next(c for c in labelled if c["n_raters"] != usual)
        case = next(k for k in cases if k.id == odd["case"])
        raise MslpipeError(f"case {odd['case']} has {odd['n_raters']} rater mask(s) but {counts.count(usual)} of "
                           f"{len(counts)} labelled cases have {usual}; every case needs the same raters",
                           (case.masks or list(case.images.values()))[0])

    def median(key, sub=None):
        vals = [c[key] if sub is None else c[key][sub] for c in labelled]
        return np.median(np.asarray(vals, dtype=float), axis=0).tolist()

    return {
        "n_cases": len(per_case),
        "n_labelled": len(labelled),
        "n_subjects": len({c["subject"] for c in labelled}),
        "n_raters": raters.pop(),
        "median": {
            "shape": median("shape"),
            "spacing": median("spacing"),
            "spacing_canonical": median("spacing_canonical"),
            "brain_bbox_mm": np.median([np.multiply(c["brain_bbox_size"], c["spacing_canonical"])
                                        for c in labelled], axis=0).tolist(),
            "brain_bbox_size": median("brain_bbox_size"),
            "lesion_voxels": float(np.median([c["lesion_voxels"][0] for c in labelled])),
            "lesion_count": float(np.median([c["lesion_count"][0] for c in labelled])),
        },
        "cases": per_case,
    }


# ---------------------------------------------------------------------------- plan
def resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise MslpipeError(f"--device must be auto, cpu or cuda, not {device!r}")
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_split_options(n_folds: int, test_fraction: float) -> None:
    """``plan --folds`` and ``--test-fraction``, refused before any scan is read."""
    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise MslpipeError(f"--folds must be at least 2 (each fold trains on some subjects and validates on others), "
                           f"not {n_folds}")
    if not (isinstance(test_fraction, int | float) and 0.0 <= test_fraction < 1.0):
        raise MslpipeError(f"--test-fraction must lie in [0, 1) (0: no held-out test subjects), not {test_fraction}")


def check_slice_axis(axis: int) -> None:
    if axis not in (0, 1, 2):
        raise MslpipeError(f"slice axis must be 0 (sagittal), 1 (coronal) or 2 (axial), not {axis}")


def make_plan(fingerprint: dict, name: str, device: str, arch: str = "leaky_unet",
              channels: list[str] | None = None, seed: int = 12345, slice_axis: int = 2) -> Plan:
    """Derive the plan from the fingerprint and the target device. ``slice_axis``: the RAS axis the network
    slices along (2 axial, the default; 1 coronal; 0 sagittal); the patch fits the brain across the other two."""
    from mslpipe import architectures  # here, not at the top: torch loads in seconds, a refused option needs none

    check_slice_axis(slice_axis)
    plan = Plan(dataset=name, channels=list(channels or ["flair"]), n_raters=fingerprint["n_raters"],
                architecture=arch, target_device=device, seed=seed, slice_axis=slice_axis)
    plan.label_policy = "mean" if plan.n_raters > 1 else "mask1"
    plan.context_slices = DEFAULT_CONTEXT_SLICES
    plan.normalization = {**plan.normalization, "scheme": DEFAULT_NORMALIZATION, "n4_levels": DEFAULT_N4_LEVELS}
    plan.augmentation.p_low_res = DEFAULT_P_LOW_RES if device == "cuda" else 0.0
    plan.bn_recalibration_batches = DEFAULT_BN_RECALIBRATION_BATCHES
    if device == "cpu":
        plan.arch_kwargs = architectures.cpu_kwargs(arch)
    plan.target_spacing = [round(float(v), 3) for v in fingerprint["median"]["spacing_canonical"]]
    volumes = [c["brain_ml"] for c in fingerprint["cases"] if c.get("brain_ml")]
    plan.brain_ml_range = [round(min(volumes), 1), round(max(volumes), 1)] if volumes else None
    bbox = np.divide(fingerprint["median"]["brain_bbox_mm"], plan.target_spacing)
    in_plane = [s + 2 * plan.crop_margin for i, s in enumerate(bbox) if i != plan.slice_axis]
    plan.arch_kwargs = architectures.fit_to_patch(arch, in_plane, **plan.arch_kwargs)
    divisor = architectures.required_divisor(arch, **plan.arch_kwargs)
    plan.patch_size = [int(math.ceil(s / divisor) * divisor) for s in in_plane]
    pixels = plan.patch_size[0] * plan.patch_size[1]
    if device == "cuda":
        # Full-width study network: batch 32 at 224×192 fits comfortably in 40 GB with bf16.
        plan.batch_size = int(np.clip(32 * (224 * 192) // pixels, 8, 64))
        # 12 augmentation workers (capped at the CPUs - 1), as nnU-Net's default: one worker makes a few
        # hundred augmented slices/s, the compiled bf16 step eats well over a thousand.
        plan.epochs, plan.iterations_per_epoch, plan.num_workers = 100, 250, 12
        plan.inference_batch_size = int(np.clip(256 * (224 * 192) // pixels, 32, 512))
    else:
        plan.batch_size = int(np.clip(12 * (128 * 128) // pixels, 2, 16))
        plan.epochs, plan.iterations_per_epoch, plan.num_workers = 20, 40, 1
        plan.inference_batch_size = CPU_INFERENCE_BATCH
    plan.validate()
    return plan.finalised()


# ---------------------------------------------------------------------------- splits
def read_groups(path: Path) -> dict[str, str]:
    """``plan --groups``: a JSON object of subject → group (the site or scanner each subject was scanned at)."""
    data = read_json(path)
    if not (isinstance(data, dict) and data and all(
            isinstance(v, str | int) and not isinstance(v, bool) and str(v) for v in data.values())):
        raise MslpipeError('--groups takes a JSON object of subject to group name, e.g. {"training01": "site_a"}',
                           path)
    return {str(k): str(v) for k, v in data.items()}


def group_folds(rest: list[str], groups: dict[str, str]) -> list[dict]:
    """Leave-one-group-out folds over the subjects ``rest``: one fold per group, which validates on its subjects and
    trains on all others, groups in name order."""
    by_group: dict[str, list[str]] = {}
    for subject in rest:
        by_group.setdefault(groups[subject], []).append(subject)
    if len(by_group) < 2:
        raise MslpipeError(f"--groups: the {len(rest)} subjects outside the test set are all in group "
                           f"{next(iter(by_group), '')!r}; leaving one group out needs subjects of at least 2 groups")
    return [{"group": g, "train": sorted(set(rest) - set(val)), "val": sorted(val)}
            for g, val in sorted(by_group.items())]


def make_splits(subjects: list[str], seed: int, n_folds: int = 5, test_fraction: float = 0.1,
                groups: dict[str, str] | None = None) -> dict:
    """Subject-level splits: held-out test set, k-fold CV over the rest, and the 8:1:1 view. With ``groups``
    (subject → site or scanner) the cross-validation leaves one group out per fold instead (``n_folds`` unused),
    which measures how the model does on a site it never saw; the test set is still drawn by subject."""
    check_split_options(n_folds, test_fraction)
    subjects = sorted(set(subjects))
    if groups is not None:
        missing = [s for s in subjects if s not in groups]
        if missing:
            raise MslpipeError(f"--groups: no group for {len(missing)} subject(s): {', '.join(missing[:8])}"
                               + (" ..." if len(missing) > 8 else ""))
    n = len(subjects)
    if n < 2:
        raise MslpipeError(f"need at least 2 labelled subjects to split, found {n}")
    rng = np.random.default_rng(seed)
    order = [subjects[i] for i in rng.permutation(n)]
    n_test = int(round(test_fraction * n))
    if test_fraction > 0 and n >= 3:
        n_test = max(n_test, 1)
    n_test = min(n_test, n - 2)
    test, rest = sorted(order[:n_test]), order[n_test:]
    warning = None
    if groups is not None:
        folds = group_folds(rest, groups)
        unknown = sorted(set(groups) - set(subjects))
        if unknown:  # a typo in the groups file would otherwise go unnoticed
            warning = (f"--groups names {len(unknown)} subject(s) this dataset does not have: "
                       f"{', '.join(unknown[:8])}" + (" ..." if len(unknown) > 8 else ""))
            log.warning(warning)
    else:
        k = min(n_folds, len(rest))
        if k < n_folds:
            warning = f"only {len(rest)} subjects outside the test set: {k} folds instead of {n_folds}"
            log.warning(warning)
        folds = [{"train": sorted(set(rest) - set(rest[i::k])), "val": sorted(rest[i::k])} for i in range(k)]
    n_val = max(1, int(round(0.1 * n)))
    split_811 = {"train": sorted(rest[n_val:]), "val": sorted(rest[:n_val]), "test": test}
    out = {"seed": seed, "test": test, "folds": folds, "split_811": split_811}
    if warning:
        out["warning"] = warning
    return out


def cases_of(subjects: list[str], fingerprint: dict) -> list[str]:
    wanted = set(subjects)
    return [c["case"] for c in fingerprint["cases"] if c["subject"] in wanted and not c["test_only"]]


# ---------------------------------------------------------------------------- the command
def run(name: str, dirs: Workdirs, input_path: Path | None = None, device: str = "auto",
        arch: str = "leaky_unet", seed: int = 12345, n_folds: int = 5, test_fraction: float = 0.1,
        overrides: dict | None = None, progress: Callable[[str, int, int, str], None] | None = None,
        groups: Path | None = None, slice_axis: int = 2) -> dict:
    """Run the whole `plan` stage; return the paths written and a few facts for the console. ``progress`` is
    told (stage, cases done, cases in all, case id) after each case of the "verify" and "preprocess" stages.
    ``groups``: a JSON file of subject → group for leave-one-group-out folds (:func:`make_splits`).
    ``slice_axis`` is :func:`make_plan`'s (the patch size follows from it, so it is not one of the ``overrides``)."""
    if overrides and overrides.get("slice_axis") is not None:
        raise MslpipeError("give the slice axis as plan's slice_axis, not as an override: the patch follows it")
    check_slice_axis(slice_axis)  # before the data is read: verifying a large dataset takes minutes
    check_split_options(n_folds, test_fraction)
    group_of = read_groups(groups) if groups is not None else None
    root = Path(input_path) if input_path else dirs.raw / name
    cases = discover(root)

    def step(stage: str):
        if progress is None:
            return None
        done = itertools.count(1)
        return lambda cid: progress(stage, next(done), len(cases), cid)

    fingerprint = verify_and_fingerprint(cases, step("verify"), root)
    fingerprint["dataset"] = name
    fingerprint["source"] = str(root.resolve())
    device = resolve_device(device)
    plan = make_plan(fingerprint, name, device, arch=arch, seed=seed, slice_axis=slice_axis)
    if overrides:
        from mslpipe.plans import apply_overrides

        plan = apply_overrides(plan, overrides)
    labelled_subjects = [c["subject"] for c in fingerprint["cases"] if not c["test_only"]]
    splits = make_splits(labelled_subjects, seed, n_folds, test_fraction, group_of)
    splits["test_only_cases"] = [c["case"] for c in fingerprint["cases"] if c["test_only"]]
    shared = sorted({c["subject"] for c in fingerprint["cases"] if c["test_only"]} & set(labelled_subjects))
    if shared:  # e.g. an nnU-Net dataset whose imagesTs holds other time points of training patients
        note = (f"test-only cases share {len(shared)} subject(s) with the training cases ({', '.join(shared[:5])}): "
                "their scores are not those of unseen patients")
        log.warning(note)
        splits["warning"] = "; ".join(filter(None, [splits.get("warning"), note]))
    plan_dir = dirs.plan_dir(name)
    write_json(plan_dir / "fingerprint.json", fingerprint)
    save_plan(plan, plan_dir / "plans.json")
    write_json(plan_dir / "splits.json", splits)
    written = preprocess.run(cases, plan, dirs.preprocessed_dir(name), step("preprocess"))
    return {"plan": plan, "splits": splits, "fingerprint": fingerprint, "preprocessed": written,
            "plan_dir": plan_dir}
