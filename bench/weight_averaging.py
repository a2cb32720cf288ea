"""The last weights against their moving average (``ema_half_life``), per fold of the real data, CPU plan.

Short schedules leave the last weights noisy: whole-volume validation Dice of the CPU plan swung between 0.1 and
0.78 from epoch to epoch on fold 0. ``train`` can keep an exponential moving average of the weights (BatchNorm
statistics included; torch's AveragedModel) with a half-life given as a fraction of the run, validate it and save
it as the final model. This trains each fold of ../shared/data/real-ms-isbi (4 leave-one-subject-out folds) once
with the average on, and scores on the fold's validation scans:

* ``last weights, running averages``: the weights after the last step with the BatchNorm statistics training kept
  (``checkpoint_latest.pt``'s ``model``; what a run saved before plans re-estimated them);
* ``last weights, BatchNorm again``: the same weights with their BatchNorm statistics estimated again as ``train``
  does after the last epoch (the plan's ``bn_recalibration_batches`` batches of the run's own loader continued;
  ``bench/bn_recalibration.py``'s ``as_train_recalibrates``): what a default run, without the average, saves. The
  average only reads the weights, so the run's steps are those of a run without it;
* ``average, BatchNorm again``: the moving average as the run saved it (``checkpoint_final.pt``; ``train``
  re-estimated its BatchNorm statistics the same way, on the same batches).

All from the same run, so the comparison holds everything else fixed. Volume Dice and lesion F1 per scan against
the expert mask, no postprocessing. Writes its section of bench/RESULTS.md after each fold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bn_recalibration import as_train_recalibrates  # noqa: E402

from mslpipe import checkpoints, inference, plan, train  # noqa: E402
from mslpipe.io import read_json  # noqa: E402
from mslpipe.plans import Workdirs  # noqa: E402
from results import fold_arguments, real_data_path, score_checkpoint, table, write_section  # noqa: E402

REAL = real_data_path()
LAST, DEFAULT, AVERAGE = "last weights, running averages", "last weights, BatchNorm again", "average, BatchNorm again"
MODELS = {LAST: "checkpoint_latest.pt", DEFAULT: "bench_last_bn_again.pt", AVERAGE: "checkpoint_final.pt"}


def last_weights_bn_again(dirs: Workdirs, fold_dir: Path) -> None:
    """Write the last weights with their BatchNorm statistics estimated again as ``train`` does (MODELS[DEFAULT],
    beside the run's checkpoints), once."""
    path = fold_dir / MODELS[DEFAULT]
    if path.exists():
        return
    predictor = inference.load_predictor([fold_dir / "checkpoint_final.pt"], device="cpu")
    model, fold_plan = predictor.models[0], predictor.plan
    if not fold_plan.bn_recalibration_batches:
        sys.exit(f"{fold_dir}: the plan does not estimate BatchNorm statistics again (bn_recalibration_batches 0)")
    model.load_state_dict(checkpoints.load(fold_dir / "checkpoint_latest.pt")["model"])
    as_train_recalibrates(model, dirs.preprocessed_dir("real"), read_json(fold_dir / "run.json")["train"], fold_plan,
                          fold_plan.bn_recalibration_batches)
    checkpoints.save(path, {"model": model.state_dict(),
                            "meta": checkpoints.load(fold_dir / "checkpoint_final.pt")["meta"]})


def run_fold(work: Path, seed: int, fold: int, epochs: int, iterations: int, half_life: float) -> dict:
    dirs = Workdirs.resolve(work / "raw", work / "plans", work / "pre", work / "results")
    if not (dirs.plan_dir("real") / "splits.json").exists():
        plan.run("real", dirs, input_path=REAL, device="cpu", test_fraction=0, seed=seed)
    plan_dir = dirs.plan_dir("real")
    splits = read_json(plan_dir / "splits.json")
    fold_dir = dirs.fold_dir("real", "leaky_unet", fold)
    if not (fold_dir / "checkpoint_final.pt").exists():
        train.run("real", dirs, fold, epochs=epochs, iterations=iterations, device="cpu", show_progress=False,
                  ema_half_life=half_life, resume=(fold_dir / "checkpoint_latest.pt").exists())
    val = train.fold_cases(splits, read_json(plan_dir / "fingerprint.json"), fold).val
    last_weights_bn_again(dirs, fold_dir)
    scores = {name: score_checkpoint(dirs.preprocessed_dir("real"), fold_dir / ckpt, val)
              for name, ckpt in MODELS.items()}
    fold_plan = read_json(fold_dir / "plan.json")
    return {"seed": seed, "fold": fold, "val": val, "scores": scores, "net": fold_plan["arch_kwargs"],
            "n_folds": len(splits["folds"]), "bn_batches": fold_plan.get("bn_recalibration_batches", 0)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    fold_arguments(ap, several_seeds=True)
    ap.add_argument("--half-life", type=float, default=0.05, help="ema_half_life, a fraction of the run [0.05]")
    args = ap.parse_args()
    if not (REAL / "training").is_dir():
        sys.exit(f"real data not found at {REAL}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mslpipe-ema-"))
    rows, per_case = [], []
    pooled: dict[str, list[tuple[float, float]]] = {name: [] for name in MODELS}
    for seed in (int(s) for s in args.seeds.split(",")):
        for fold in (int(k) for k in args.folds.split(",")):
            r = run_fold(work / f"seed{seed}", seed, fold, args.epochs, args.iterations, args.half_life)
            means = {}
            for name, by_case in r["scores"].items():
                pooled[name] += list(by_case.values())
                means[name] = np.mean(list(by_case.values()), axis=0)
            rows.append([seed, fold, ", ".join(r["val"]), *(f"{means[n][0]:.3f} / {means[n][1]:.3f}" for n in MODELS),
                         f"{means[AVERAGE][0] - means[DEFAULT][0]:+.3f}"])
            per_case += [[seed, fold, case, *(f"{r['scores'][n][case][0]:.3f} / {r['scores'][n][case][1]:.3f}"
                                              for n in MODELS)] for case in r["val"]]
            pool = {n: np.mean(v, axis=0) for n, v in pooled.items()}
            scans = len(pooled[AVERAGE])
            diff = [a[0] - d[0] for a, d in zip(pooled[AVERAGE], pooled[DEFAULT], strict=True)]
            body = (f"CPU plan (leaky_unet {r['net']}), {args.epochs} epochs × {args.iterations} iterations per fold, "
                    f"`ema_half_life` {args.half_life:g} (a half-life of {args.half_life * args.epochs:g} epochs). "
                    f"Folds by subject (leave one subject out, {r['n_folds']} folds; which subject each fold holds "
                    "out depends on the seed). Cells: volume Dice / lesion F1 on the validation scans, no "
                    f"postprocessing; all from the same run, BatchNorm estimated again on "
                    f"{r['bn_batches']} batches (see `bench/weight_averaging.py`). Dice change: the average against "
                    "the last weights with BatchNorm estimated again (what a run without the average saves).\n\n"
                    + table(["seed", "fold", "validation scans", *MODELS, "Dice change"], rows)
                    + f"\n\nPooled over {scans} scan runs: "
                    + ", ".join(f"{n} {pool[n][0]:.3f} / {pool[n][1]:.3f}" for n in MODELS)
                    + f". The average ahead in Dice on {sum(d > 0 for d in diff)}, behind on "
                    f"{sum(d < 0 for d in diff)}.\n\n"
                    + table(["seed", "fold", "scan", *MODELS], per_case))
            print(body, flush=True)
            write_section("weight_averaging", "Last weights against their moving average (CPU plan, real data)",
                          body)


if __name__ == "__main__":
    main()
