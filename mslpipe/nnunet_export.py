"""`mslpipe export-nnunet`: a planned dataset in nnU-Net v2's raw format, with mslpipe's folds.

Writes, into the dataset folder ``DIR`` (nnU-Net expects it at ``$nnUNet_raw/DatasetNNN_NAME``, three
digits, e.g. ``Dataset501_isbi``):

* ``dataset.json``: ``channel_names`` (``{"0": "FLAIR"}``), ``labels`` (``{"background": 0, "lesion": 1}``),
  ``numTraining``, ``file_ending`` ``.nii.gz``;
* ``imagesTr/CASE_0000.nii.gz`` and ``labelsTr/CASE.nii.gz`` for the cross-validation subjects;
  ``imagesTs/CASE_0000.nii.gz`` for the held-out test subjects and test-only scans (with
  ``labelsTs/CASE.nii.gz`` where a test scan has masks; nnU-Net ignores that folder);
* ``splits_final.json``: mslpipe's subject-level folds as nnU-Net reads them, a list of
  ``{"train": [case ids], "val": [case ids]}``; every scan of a subject is in the same partition. nnU-Net
  reads it from ``$nnUNet_preprocessed/DatasetNNN_NAME/splits_final.json``; nnunetv2 2.8 copies it there
  from the raw folder during ``nnUNetv2_plan_and_preprocess``, older versions need it copied (or
  ``--preprocessed-dir`` to write it there too);
* ``subjects.json``: ``{case: subject}``, so that ``mslpipe plan -i DIR`` reads the export back with the
  same subjects (:func:`mslpipe.datasets.discover`).

Images are copied byte for byte when they are ``.nii.gz`` already; ``.nii`` images are re-encoded by
nibabel with their own header (affine, qform and sform kept). Sources are the scans the plan was made
from (``plans/NAME/fingerprint.json``'s ``source``).

**Labels.** nnU-Net needs one integer label map per scan; mslpipe may train on several raters. The
label is the plan's ``label_policy`` (or ``label_policy=``) binarised at 0.5: ``mask1`` is rater 1,
``union`` any rater, ``intersection`` every rater, and ``mean`` (mslpipe's soft labels) the voxels that at
least half of the raters marked, i.e. the union for two raters. That matches mslpipe's operating point
(a model trained on the mean is thresholded at 0.5). With one rater every policy gives that rater's mask.

**Plans.** nnU-Net builds its network from the plans' ``configurations[C]["architecture"]``:
``pydoc.locate(network_class_name)(input_channels=..., num_classes=..., deep_supervision=...,
**arch_kwargs)`` (nnunetv2's ``get_network_from_plans``). :func:`leaky_unet_architecture` names
:class:`mslpipe.architectures.nnunet_adapter.NnUNetLeakyUNet` there, with the plan's ``arch_kwargs`` and
the ``strides`` nnU-Net derives its deep-supervision scales from. ``--plans`` writes that entry as a
fragment (``nnUNetPlans_leaky_unet.fragment.json``): a whole plans file needs nnU-Net's own planner.
``--nnunet-plans PATH`` takes the ``nnUNetPlans.json`` that ``nnUNetv2_plan_and_preprocess`` wrote and
writes ``nnUNetPlans_leaky_unet.json`` beside it: the same plans with the 2d configuration's architecture
replaced (the data identifier is kept, so the preprocessed data is shared). Train it with
``nnUNetv2_train DATASET 2d FOLD -p nnUNetPlans_leaky_unet`` with the repository (or an installed
mslpipe) importable. nnU-Net trains 2 output channels with softmax (background, lesion) where mslpipe
trains 1 with a sigmoid.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe.datasets import Case, discover
from mslpipe.errors import MslpipeError
from mslpipe.io import atomic_path, load_image, load_mask, read_json, write_json
from mslpipe.plans import LABEL_POLICIES, Workdirs, load_plan

log = logging.getLogger(__name__)

FILE_ENDING = ".nii.gz"
LABELS = {"background": 0, "lesion": 1}
NETWORK_CLASS = "mslpipe.architectures.nnunet_adapter.NnUNetLeakyUNet"
PLANS_NAME = "nnUNetPlans_leaky_unet"
FRAGMENT_NAME = f"{PLANS_NAME}.fragment.json"


# ---------------------------------------------------------------------------- labels
def binary_label(masks: list[np.ndarray], policy: str) -> np.ndarray:
    """One uint8 0/1 label map from one or more raters' masks (see the module docstring)."""
    if policy not in LABEL_POLICIES:
        raise MslpipeError(f"label policy must be one of {', '.join(LABEL_POLICIES)}, not {policy!r}")
    if not masks:
        raise MslpipeError("no mask to make a label from")
    stack = np.stack([np.asarray(m) > 0 for m in masks])
    if policy == "mask1":
        label = stack[0]
    elif policy == "union":
        label = stack.any(axis=0)
    elif policy == "intersection":
        label = stack.all(axis=0)
    else:  # mean >= 0.5: at least half of the raters
        label = 2 * stack.sum(axis=0) >= len(masks)
    return label.astype(np.uint8)


# ---------------------------------------------------------------------------- files
def _copy_image(src: Path, dst: Path) -> None:
    """``src`` (NIfTI) to ``dst`` (``.nii.gz``): a byte copy if already gzipped, else re-encoded."""
    if src.name.endswith(".nii.gz"):
        with atomic_path(dst) as tmp:
            shutil.copyfile(src, tmp)
        return
    import nibabel as nib

    img = nib.load(str(src))
    with atomic_path(dst) as tmp:
        nib.save(img, str(tmp))


def _write_label(label: np.ndarray, image_path: Path, dst: Path) -> None:
    """Save ``label`` with the image's own header, so nnU-Net sees exactly the image's geometry."""
    import nibabel as nib

    image = nib.load(str(image_path))
    header = image.header.copy()
    out = type(image)(label, image.affine, header)
    out.set_data_dtype(np.uint8)
    out.header.set_slope_inter(1.0, 0.0)
    with atomic_path(dst) as tmp:
        nib.save(out, str(tmp))


def _export_case(case: Case, out: Path, images: str, labels: str | None, policy: str) -> None:
    first = next(iter(case.images.values()))
    for i, path in enumerate(case.images.values()):
        _copy_image(path, out / images / f"{case.id}_{i:04d}{FILE_ENDING}")
    if labels is None or not case.masks:
        return
    data, affine = load_image(first)
    masks = [load_mask(m, like_shape=data.shape, like_affine=affine) for m in case.masks]
    _write_label(binary_label(masks, policy), first, out / labels / f"{case.id}{FILE_ENDING}")


# ---------------------------------------------------------------------------- folds
def nnunet_splits(splits: dict, fingerprint: dict) -> list[dict[str, list[str]]]:
    """mslpipe's subject-level folds as nnU-Net's ``splits_final.json`` (case ids, test subjects left out)."""
    by_subject: dict[str, list[str]] = {}
    for c in fingerprint["cases"]:
        if not c["test_only"]:
            by_subject.setdefault(c["subject"], []).append(c["case"])

    def cases(subjects: list[str]) -> list[str]:
        return sorted(cid for s in subjects for cid in by_subject.get(s, []))

    return [{"train": cases(f["train"]), "val": cases(f["val"])} for f in splits["folds"]]


# ---------------------------------------------------------------------------- plans
def leaky_unet_architecture(arch_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """The plans' ``architecture`` entry that makes nnU-Net build mslpipe's ``leaky_unet``."""
    kwargs = dict(arch_kwargs or {})
    if "strides" in kwargs or "deep_supervision" in kwargs:
        raise MslpipeError("arch_kwargs must not set 'strides' or 'deep_supervision': they are derived here")
    depth = kwargs.get("depth", 4)
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
        raise MslpipeError(f"leaky_unet depth must be a positive integer, not {depth!r}")
    # nnU-Net derives its deep-supervision scales from these: one output per decoder level.
    kwargs["strides"] = [[1, 1]] + [[2, 2]] * depth
    return {"network_class_name": NETWORK_CLASS, "arch_kwargs": kwargs, "_kw_requires_import": []}


def patch_plans(plans: dict[str, Any], arch_kwargs: dict[str, Any] | None = None, *,
                plans_name: str = PLANS_NAME, configuration: str = "2d") -> dict[str, Any]:
    """A copy of an nnU-Net v2 plans dict whose ``configuration`` trains ``leaky_unet``.

    Only ``plans_name`` and ``configurations[configuration]["architecture"]`` change; the patch size,
    batch size, spacing, normalisation and data identifier stay nnU-Net's. Raises MslpipeError if the
    configuration is missing, not 2D, or has a patch size the network cannot take.
    """
    confs = plans.get("configurations") if isinstance(plans, dict) else None
    if not isinstance(confs, dict) or configuration not in confs:
        raise MslpipeError(f"not an nnU-Net v2 plans file with a {configuration!r} configuration "
                           f"(found {sorted(confs) if isinstance(confs, dict) else 'none'})")
    arch = leaky_unet_architecture(arch_kwargs)
    conf = confs[configuration]
    patch = conf.get("patch_size")
    if patch is None and "inherits_from" in conf:
        patch = confs.get(conf["inherits_from"], {}).get("patch_size")
    if not isinstance(patch, list) or len(patch) != 2:
        raise MslpipeError(f"configuration {configuration!r} has patch size {patch!r}: leaky_unet is 2D only")
    divisor = 2 ** arch["arch_kwargs"].get("depth", 4)
    if any(int(p) % divisor for p in patch):
        raise MslpipeError(f"patch size {patch} of {configuration!r} is not divisible by {divisor} "
                           f"(2**depth): lower leaky_unet's depth or edit the patch size")
    new = copy.deepcopy(plans)
    new["plans_name"] = plans_name
    new["configurations"][configuration]["architecture"] = arch
    new.setdefault("mslpipe", {})[configuration] = {"network": "leaky_unet", "outputs": "softmax, 2 classes"}
    return new


def write_patched_plans(nnunet_plans: str | Path, arch_kwargs: dict[str, Any] | None = None, *,
                        plans_name: str = PLANS_NAME, configuration: str = "2d") -> Path:
    """Read nnU-Net's ``nnUNetPlans.json``; write ``PLANS_NAME.json`` beside it; return its path."""
    nnunet_plans = Path(nnunet_plans)
    if nnunet_plans.stem == plans_name:
        raise MslpipeError(f"refusing to overwrite the input: it is already {plans_name}", nnunet_plans)
    try:
        patched = patch_plans(read_json(nnunet_plans), arch_kwargs, plans_name=plans_name,
                              configuration=configuration)
    except MslpipeError as exc:  # patch_plans reads a dict: name the file it came from
        if exc.path is not None:
            raise
        raise MslpipeError(str(exc), nnunet_plans) from exc
    patched["mslpipe"]["patched_from"] = nnunet_plans.name
    return write_json(nnunet_plans.with_name(f"{plans_name}.json"), patched)


# ---------------------------------------------------------------------------- the command
def run(name: str, dirs: Workdirs, out_dir: str | Path, *, label_policy: str | None = None,
        plans: bool = False, nnunet_plans: str | Path | None = None,
        preprocessed_dir: str | Path | None = None) -> dict[str, Any]:
    """Export the planned dataset ``name`` into ``out_dir``; return what was written."""
    out = Path(out_dir)
    plan_dir = dirs.plan_dir(name)
    plan = load_plan(plan_dir / "plans.json")
    fingerprint = read_json(plan_dir / "fingerprint.json")
    splits = read_json(plan_dir / "splits.json")
    policy = label_policy or plan.label_policy
    if policy not in LABEL_POLICIES:
        raise MslpipeError(f"label policy must be one of {', '.join(LABEL_POLICIES)}, not {policy!r}")
    if (nnunet_plans is not None or plans) and plan.architecture != "leaky_unet":
        log.warning("the plan's network is %s; the nnU-Net plans name leaky_unet", plan.architecture)
    cases = {c.id: c for c in discover(fingerprint["source"], plan.channels)}
    planned = {c["case"] for c in fingerprint["cases"]}
    if set(cases) != planned:
        raise MslpipeError("the dataset on disk no longer matches the plan's fingerprint (cases "
                           f"{sorted(set(cases) ^ planned)[:5]}): run `mslpipe plan` again", fingerprint["source"])
    test_subjects = set(splits.get("test", []))
    train_ids = sorted(c.id for c in cases.values() if not c.test_only and c.subject not in test_subjects)
    test_ids = sorted(set(cases) - set(train_ids))
    for cid in train_ids:
        _export_case(cases[cid], out, "imagesTr", "labelsTr", policy)
    for cid in test_ids:
        _export_case(cases[cid], out, "imagesTs", "labelsTs", policy)
    folds = nnunet_splits(splits, fingerprint)
    dataset_json = {
        "channel_names": {str(i): ch.upper() for i, ch in enumerate(plan.channels)},
        "labels": dict(LABELS),
        "numTraining": len(train_ids),
        "file_ending": FILE_ENDING,
        "name": name,
        "description": f"exported by mslpipe export-nnunet from plan {plan.hash}; labels: {policy} of "
                       f"{plan.n_raters} rater(s), binarised at 0.5; folds: splits_final.json (by subject)",
    }
    written = {
        "dataset_json": write_json(out / "dataset.json", dataset_json),
        "splits_final": write_json(out / "splits_final.json", folds),
        "subjects": write_json(out / "subjects.json", {cid: cases[cid].subject for cid in sorted(cases)}),
        "training": train_ids, "test": test_ids, "label_policy": policy, "folds": folds,
    }
    if preprocessed_dir is not None:
        written["splits_final_preprocessed"] = write_json(Path(preprocessed_dir) / "splits_final.json", folds)
    if plans or nnunet_plans is not None:
        fragment = {"plans_name": PLANS_NAME,
                    "configurations": {"2d": {"architecture": leaky_unet_architecture(plan.arch_kwargs)}},
                    "_how": "merge into the nnUNetPlans.json of nnUNetv2_plan_and_preprocess, or run "
                            "`mslpipe export-nnunet --nnunet-plans PATH`"}
        written["fragment"] = write_json(out / FRAGMENT_NAME, fragment)
    if nnunet_plans is not None:
        written["plans"] = write_patched_plans(nnunet_plans, plan.arch_kwargs)
    log.info("exported %d training and %d test scans of %s to %s", len(train_ids), len(test_ids), name, out)
    return written
