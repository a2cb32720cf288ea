"""Stages that string other stages together: `evaluate -d NAME` and `demo`.

Sits above plan/train/predict (it calls them), below the CLI.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe import evaluate, plan, postprocess, predict, train
from mslpipe.datasets import discover
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image, read_json, save_nifti, write_json
from mslpipe.plans import Workdirs, load_plan

log = logging.getLogger(__name__)


def _references(fingerprint: dict) -> dict[str, list[Path]]:
    return {c.id: c.masks for c in discover(fingerprint["source"]) if c.masks}


def evaluate_dataset(name: str, dirs: Workdirs, arch: str | None = None, device: str = "auto",
                     candidates_mm3=(0, 3, 5, 10, 20)) -> dict[str, Any]:
    """Score out-of-fold predictions (cross-validation) and the fold ensemble on the test split.

    Chooses the minimum lesion size on the out-of-fold predictions, stores it in
    ``postprocessing.json`` (which `predict` applies) and writes ``summary.json``.
    """
    plan_dir = dirs.plan_dir(name)
    the_plan = load_plan(plan_dir / "plans.json")
    arch = arch or the_plan.architecture
    fingerprint, splits = read_json(plan_dir / "fingerprint.json"), read_json(plan_dir / "splits.json")
    refs = _references(fingerprint)
    root = dirs.results_dir(name, arch)
    oof = sorted(root.glob("fold_[0-9]*/validation/*.nii.gz"))
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
    summary = evaluate.score_pairs(cv_pairs, connectivity=connectivity, slice_axis=2)
    summary["what"] = ("cross-validation: out-of-fold predictions of each trained fold's final model, "
                       f"postprocessed with min_lesion_mm3={pp['min_lesion_mm3']}")
    summary["folds"] = sorted({p.pred_path.parent.parent.name for p in pairs})
    summary["postprocessing"] = pp

    test_cases = [c for c, _ in refs.items()
                  if any(f["case"] == c and f["subject"] in splits["test"] for f in fingerprint["cases"])]
    if test_cases:
        test_dir = root / "test"
        report = predict.run(Path(fingerprint["source"]), test_dir, dirs=dirs, dataset=name, arch=arch,
                             device=device, overwrite=True)
        if report.failed:
            raise MslpipeError(f"prediction failed on test cases {report.failed}")
        test_pairs = [evaluate.CasePair(c, test_dir / f"{c}.nii.gz", refs[c]) for c in sorted(test_cases)]
        summary["test"] = evaluate.score_pairs(test_pairs, connectivity=connectivity, slice_axis=2)
        summary["test"]["what"] = "held-out test subjects, ensemble of the trained folds, postprocessed"
    write_json(root / "summary.json", summary)
    return summary


def demo(out: Path, *, subjects: int = 10, timepoints: int = 2, shape=(64, 72, 48), epochs: int = 12,
         iterations: int = 30, seed: int = 0, device: str = "auto", fresh: bool = True,
         arch_kwargs: dict | None = None) -> dict[str, Any]:
    """synth → plan → train fold 0 → predict the test split → evaluate; all under ``out``."""
    from mslpipe import synth

    if fresh and out.exists():
        shutil.rmtree(out)
    dirs = Workdirs.resolve(out / "raw_data", out / "plans", out / "preprocessed", out / "results")
    name = "synthetic"
    synth.make_dataset(dirs.raw / name, subjects=subjects, timepoints=timepoints, shape=shape, seed=seed)
    overrides = {"arch_kwargs": arch_kwargs} if arch_kwargs else None
    planned = plan.run(name, dirs, device="cpu" if device == "auto" else device, seed=seed, overrides=overrides)
    trained = train.run(name, dirs, 0, epochs=epochs, iterations=iterations, device=device)
    summary = evaluate_dataset(name, dirs, device=device)
    return {"dirs": dirs, "plan": planned["plan"], "splits": planned["splits"], "train": trained,
            "summary": summary}
