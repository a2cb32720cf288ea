"""Stages that string other stages together: `evaluate -d NAME`, `demo` and `compare`.

Sits above plan/train/predict (it calls them), below the CLI.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe import evaluate, longitudinal, plan, postprocess, predict, train
from mslpipe import report as lesion_report
from mslpipe.datasets import Source, discover, gather_sources
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, load_mask, read_json, save_nifti, saved_probability, write_json
from mslpipe.plans import Workdirs, load_plan

log = logging.getLogger(__name__)


def train_folds(dataset: str, dirs: Workdirs, fold: str) -> list[int | str]:
    """``train --fold``: a fold number, ``all`` (every fold of the plan's splits) or ``final``."""
    if fold == "all":
        return list(range(len(read_json(dirs.plan_dir(dataset) / "splits.json")["folds"])))
    if fold == "final":
        return ["final"]
    if fold.isdigit():
        return [int(fold)]
    raise MslpipeError(f"--fold must be a number, 'all' or 'final', not {fold!r}")


def evaluate_dataset(name: str, dirs: Workdirs, arch: str | None = None, device: str = "auto",
                     candidates_mm3=(0, 3, 5, 10, 20), report: bool = False) -> dict[str, Any]:
    """Score out-of-fold predictions (cross-validation) and the fold ensemble on the test split.

    Chooses the minimum lesion size on the out-of-fold predictions, stores it in
    ``postprocessing.json`` (which `predict` applies) and writes ``summary.json``. With ``report``,
    ``crossval/report.html`` shows each out-of-fold prediction on its FLAIR with true positives,
    false positives and false negatives against rater 1.
    """
    plan_dir = dirs.plan_dir(name)
    the_plan = load_plan(plan_dir / "plans.json")
    arch = arch or the_plan.architecture
    fingerprint, splits = read_json(plan_dir / "fingerprint.json"), read_json(plan_dir / "splits.json")
    cases = {c.id: c for c in discover(fingerprint["source"])}
    refs = {cid: c.masks for cid, c in cases.items() if c.masks}
    root = dirs.results_dir(name, arch)
    oof = sorted(root.glob("fold_[0-9]*/validation/*.nii.gz"))
    if not oof and not root.exists():
        from mslpipe import architectures

        architectures.check_name(arch)
    if not oof:
        raise MslpipeError(f"no out-of-fold predictions: train a fold first (`mslpipe train -d {name} --fold 0`)",
                           root)
    pairs = [evaluate.CasePair(p.name[:-7], p, refs[p.name[:-7]]) for p in oof]
    connectivity = the_plan.postprocessing.get("connectivity", 26)
    pp = evaluate.select_min_lesion_size(pairs, candidates_mm3, connectivity=connectivity)
    write_json(root / "postprocessing.json", pp)

    cv_dir = root / "crossval"
    cv_pairs = []
    for pair in pairs:
        pred, affine = load_image(pair.pred_path)
        spacing = tuple(float(s) for s in np.linalg.norm(affine[:3, :3], axis=0))
        mask = postprocess.remove_small_components(pred > 0.5, spacing, pp["min_lesion_mm3"], connectivity)
        save_nifti(cv_dir / f"{pair.case}.nii.gz", mask, affine)
        cv_pairs.append(evaluate.CasePair(pair.case, cv_dir / f"{pair.case}.nii.gz", pair.ref_paths))
        if report:
            image, _ = load_image(next(iter(cases[pair.case].images.values())))
            ref = load_mask(pair.ref_paths[0], like_shape=mask.shape, like_affine=affine)
            lesion_report.write_case_report(cv_dir, pair.case, image, mask, affine, ref=ref,
                                            connectivity=connectivity)
    if report:
        lesion_report.write_report_index(cv_dir)
    summary = evaluate.score_pairs(cv_pairs, connectivity=connectivity)
    summary["what"] = ("cross-validation: out-of-fold predictions of each trained fold's final model, "
                       f"postprocessed with min_lesion_mm3={pp['min_lesion_mm3']}")
    summary["folds"] = sorted({p.pred_path.parent.parent.name for p in pairs})
    summary["n_folds_planned"] = len(splits["folds"])
    summary["postprocessing"] = pp

    # the held-out test subjects, and the dataset's own test cases where it has their masks (nnU-Net's labelsTs)
    test_cases = [c for c, _ in refs.items()
                  if any(f["case"] == c and (f["subject"] in splits["test"] or f["test_only"])
                         for f in fingerprint["cases"])]
    if test_cases:
        test_dir = root / "test"
        report = predict.run(Path(fingerprint["source"]), test_dir, dirs=dirs, dataset=name, arch=arch,
                             device=device, overwrite=True)
        if report.failed:
            raise MslpipeError(f"prediction failed on test cases {report.failed}")
        test_pairs = [evaluate.CasePair(c, test_dir / f"{c}.nii.gz", refs[c]) for c in sorted(test_cases)]
        summary["test"] = evaluate.score_pairs(test_pairs, connectivity=connectivity)
        summary["test"]["what"] = ("held-out test subjects (and the dataset's own labelled test cases), ensemble of "
                                   "the trained folds, postprocessed")
    write_json(root / "summary.json", summary)
    return summary


DEMO_MARK = ".mslpipe-demo"


def _fresh_demo_folder(out: Path) -> None:
    """Empty ``out`` for a demo: create it, or replace an earlier demo's folder; refuse any other folder."""
    if out.exists() and not out.is_dir():
        raise MslpipeError("demo needs a folder here, and this is a file", out)
    if out.is_dir() and any(out.iterdir()):
        if not (out / DEMO_MARK).is_file():
            raise MslpipeError("demo replaces its folder, and this one holds files no demo wrote: give another "
                               "-o, or empty it", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARK).write_text("written by `mslpipe demo`: the next demo into this folder deletes and rewrites it\n",
                                 encoding="utf-8")


def demo(out: Path, *, subjects: int = 10, timepoints: int = 2, shape=(64, 72, 48), epochs: int = 20,
         iterations: int = 30, seed: int = 0, device: str = "auto", fresh: bool = True,
         arch_kwargs: dict | None = None) -> dict[str, Any]:
    """synth → plan → train fold 0 → predict the test split → evaluate; all under ``out``.

    ``fresh``: start from an empty ``out``. A folder that an earlier demo wrote (it holds :data:`DEMO_MARK`) is
    replaced; any other folder with something in it is refused, so that a mistyped ``-o`` deletes nothing."""
    from mslpipe import synth

    if fresh:
        _fresh_demo_folder(out)
    dirs = Workdirs.resolve(out / "raw_data", out / "plans", out / "preprocessed", out / "results")
    name = "synthetic"
    synth.make_dataset(dirs.raw / name, subjects=subjects, timepoints=timepoints, shape=shape, seed=seed)
    overrides = {"arch_kwargs": arch_kwargs} if arch_kwargs else None
    planned = plan.run(name, dirs, device="cpu" if device == "auto" else device, seed=seed, overrides=overrides)
    trained = train.run(name, dirs, 0, epochs=epochs, iterations=iterations, device=device)
    summary = evaluate_dataset(name, dirs, device=device)
    return {"dirs": dirs, "plan": planned["plan"], "splits": planned["splits"], "train": trained,
            "summary": summary}


# ---------------------------------------------------------------------------- longitudinal change
def compare_scans(baseline: Path, followup: Path, out: Path, *, dirs: Workdirs, dataset: str | None = None,
                  checkpoint: list[Path] | None = None, device: str = "auto", register: bool = False,
                  **thresholds) -> longitudinal.Change:
    """`mslpipe compare BASELINE FOLLOWUP`: two masks, or two FLAIR images and a model to segment them.

    A file whose values are not all 0/1 is taken for an image: with a model (``dataset``'s trained folds
    or ``checkpoint``) it is segmented into ``out/segmentations/{baseline,followup}/`` first; without one
    it is refused. ``register``: the two images come from two visits, not one grid: the follow-up image is
    registered to the baseline (rigid, :mod:`mslpipe.registration`) and its mask compared on the baseline grid;
    ``out/registered/`` keeps the follow-up image and mask on that grid and the transform.
    """
    paths, segmented, dicom = [], {}, {}
    for role, path in (("baseline", Path(baseline)), ("followup", Path(followup))):
        if path.is_dir():  # a DICOM series: an image, segmented like a NIfTI image
            dicom[role] = _one_scan(path, role)
            if dataset is None and not checkpoint:
                raise MslpipeError(f"the {role} is a DICOM folder, an image: give a model (-d NAME or --checkpoint "
                                   "PATH) to segment it", path)
        elif longitudinal.read_mask(path) is not None or (dataset is None and not checkpoint):
            if register:
                raise MslpipeError("--register aligns the two FLAIR images: give the images and a model (-d NAME "
                                   "or --checkpoint PATH) to segment them, not masks (this file holds only 0 and 1)",
                                   path)
            paths.append(path)  # a mask, or an image that load_pair refuses with the reason
            continue
        seg_dir = out / "segmentations" / role
        report = predict.run(path, seg_dir, dirs=dirs, dataset=dataset, checkpoint=checkpoint, device=device,
                             overwrite=True, save_probabilities=True)
        if report.failed:
            raise MslpipeError(f"segmenting the {role} scan failed: {report.failed[0][1]}")
        paths.append(seg_dir / f"{report.written[0]}.nii.gz")
        segmented[role] = {"image": str(path), "mask": str(paths[-1])}
    extra: dict[str, Any] = {"segmented": segmented} if segmented else {}
    followup_probability = None
    if register:
        images = [_read_scan(dicom.get(role), path) for role, path in (("baseline", baseline), ("followup", followup))]
        paths[1], extra["registration"], followup_probability, covered = _register_followup(
            images, Path(followup), paths[1], out / "registered")
    else:
        covered = None
    change = longitudinal.compare_files(paths[0], paths[1], out, extra=extra or None,
                                        followup_probability=followup_probability, coverage=covered, **thresholds)
    if register:
        change.summary["registration"] = extra["registration"]
    return change


def _one_scan(path: Path, role: str) -> Source:
    """The single scan in a DICOM folder (a study's FLAIR series, or the one series there)."""
    sources = gather_sources(path)
    if len(sources) != 1:
        raise MslpipeError(f"the {role} folder holds {len(sources)} scans ({', '.join(s.case for s in sources)}): "
                           "give the folder of one series", path)
    return sources[0]


def _read_scan(source: Source | None, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A DICOM folder's scan (its ``source``, found already) or a NIfTI image: (first channel, affine)."""
    if source is None:
        return load_image(path)
    channels, affine = source.read()
    return channels[0], affine


def _register_followup(images: list[tuple[np.ndarray, np.ndarray]], followup: Path, followup_mask: Path,
                       reg_dir: Path) -> tuple[Path, dict, np.ndarray | None, np.ndarray]:
    """Register the follow-up image to the baseline (``images``: both, with their affines), map the follow-up's
    mask onto the baseline grid (by its probability map where predict saved one beside it, which is then mapped
    too); (that mask, summary, that map or None, the baseline voxels the follow-up's field of view reaches)."""
    from mslpipe import registration
    from mslpipe.brainmask import brain_mask

    (base, base_affine), (follow, follow_affine) = images
    rigid = registration.register_rigid(base, base_affine, follow, follow_affine, where=followup)
    mask, mask_affine = load_image(followup_mask)
    probability = saved_probability(followup_mask, mask.shape)
    files = {"followup_mask": reg_dir / "followup_mask_on_baseline.nii.gz",
             "followup_image": reg_dir / "followup_on_baseline.nii.gz",
             "transform": reg_dir / "followup_on_baseline.tfm"}
    moved_mask, probability = registration.resample_lesions(mask, mask_affine, base.shape, base_affine, rigid,
                                                            probability)
    save_nifti(files["followup_mask"], moved_mask, base_affine)
    save_nifti(files["followup_image"], registration.resample_image(follow, follow_affine, base.shape, base_affine,
                                                                    rigid), base_affine, dtype=np.float32)
    registration.write_transform(rigid, files["transform"])
    covered = rigid.covered
    brain = brain_mask(base)
    share = float((covered & brain).sum() / max(int(brain.sum()), 1))
    summary = {**rigid.summary(), "baseline_brain_covered": round(share, 4), **{k: str(v) for k, v in files.items()}}
    notes = []
    if not rigid.correlation_after >= registration.MIN_ALIGNED_CORRELATION:
        notes.append(f"the aligned scans correlate poorly ({rigid.correlation_after:.2f} < "
                     f"{registration.MIN_ALIGNED_CORRELATION}): check {files['followup_image'].name} against the "
                     "baseline before trusting the change")
    if share < 0.99:
        notes.append(f"the follow-up's field of view covers {100 * share:.0f} % of the baseline's brain: baseline "
                     "lesions reaching outside it without a partner are 'outside', not 'disappeared'")
    if notes:
        summary["warning"] = "; ".join(notes)
        log.warning("%s: %s", followup, summary["warning"])
    return files["followup_mask"], summary, probability, covered


def compare_subject(dataset: str, subject: str, out: Path, *, dirs: Workdirs, pred: Path | None = None,
                    **thresholds) -> list[dict[str, Any]]:
    """`mslpipe compare -d NAME --subject S`: every consecutive pair of the subject's time points.

    Compares the masks in ``pred`` (``<case>.nii.gz``, e.g. `mslpipe predict` output) when given, else
    the dataset's first rater's reference masks (``mask1``). Writes ``out/<case>_to_<case>/`` per pair
    and ``out/<subject>_summary.json``.
    """
    fingerprint = dirs.plan_dir(dataset) / "fingerprint.json"
    root = Path(read_json(fingerprint)["source"]) if fingerprint.exists() else dirs.raw / dataset
    cases = discover(root)
    chosen = sorted((c for c in cases if c.subject == subject), key=lambda c: c.timepoint)
    if not chosen:
        raise MslpipeError(f"no subject {subject!r} (subjects: {', '.join(sorted({c.subject for c in cases}))})",
                           root)
    if len(chosen) < 2:
        raise MslpipeError(f"subject {subject} has one time point only; compare needs two", root)

    def mask_of(case) -> Path:
        if pred is not None:
            found = [Path(pred) / f"{case.id}{suffix}" for suffix in (".nii.gz", ".nii")]
            found = [p for p in found if p.exists()]
            if not found:
                raise MslpipeError(f"no predicted mask for {case.id} ({case.id}.nii.gz)", pred)
            return found[0]
        if not case.masks:
            raise MslpipeError(f"case {case.id} has no reference mask; give --pred DIR", root)
        return case.masks[0]

    pairs = []
    for before, after in zip(chosen, chosen[1:], strict=False):
        pair_dir = Path(out) / f"{before.id}_to_{after.id}"
        source = "predicted masks" if pred is not None else "reference masks (rater 1)"
        change = longitudinal.compare_files(mask_of(before), mask_of(after), pair_dir, **thresholds,
                                            extra={"subject": subject, "baseline_case": before.id,
                                                   "followup_case": after.id, "masks": source})
        pairs.append({"baseline_case": before.id, "followup_case": after.id, "folder": pair_dir.name,
                      **{k: change.summary[k] for k in ("counts", "volume_baseline_ml", "volume_followup_ml",
                                                        "volume_change_ml")}})
    write_json(Path(out) / f"{subject}_summary.json", {"dataset": dataset, "subject": subject,
                                                       "masks": source, "pairs": pairs})
    return pairs
