"""Cross-validation on the real MS scans with the CPU plan: what a 2-core machine can train.

Plans ../shared/data/real-ms-isbi with no held-out test set (4 subjects → leave-one-subject-out
folds; training03's three scans always stay together), trains every fold with the CPU plan's
narrow leaky_unet for a fixed number of epochs, then runs `evaluate` (out-of-fold predictions,
postprocessing chosen on them). With several ``--context-slices`` values it runs the whole
cross-validation once per value (2D and 2.5D input, everything else equal) and tables them side by
side. Writes its section of bench/RESULTS.md. This measures the pipeline on real data under a small
compute budget; it is not the full-width GPU model.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import plan, train, workflow  # noqa: E402
from mslpipe.plans import Workdirs  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402

REAL = real_data_path()
DEFAULT_SEED = 12345  # plan.run's default
KEYS = ["dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "abs_volume_diff_ml", "slice_dice_study"]
HEADERS = ["Dice", "IoU", "PPV", "TPR", "LTPR", "LFPR", "lesion F1", "abs ΔV mL", "slice Dice (study)"]


def _r(v):
    return round(v, 3) if v is not None else "—"


def cross_validate(work: Path, context: int | None, seed: int, epochs: int, iterations: int) -> dict:
    """Plan (with ``context_slices`` when given), train every fold, evaluate; the plan, summary and minutes."""
    dirs = Workdirs.resolve(work / "raw", work / "plans", work / "pre", work / "results")
    overrides = None if context is None else {"context_slices": context}
    planned = plan.run("real", dirs, input_path=REAL, device="cpu", test_fraction=0, overrides=overrides, seed=seed)
    p = planned["plan"]
    minutes = []
    for k in range(len(planned["splits"]["folds"])):
        fold_dir = dirs.fold_dir("real", p.architecture, k)
        train.run("real", dirs, k, epochs=epochs, iterations=iterations, device="cpu", show_progress=False,
                  resume=(fold_dir / "checkpoint_latest.pt").exists())
        with open(fold_dir / "log.csv", newline="") as f:  # the epochs' own seconds: right after a resume too
            minutes.append(sum(float(r["seconds"]) for r in csv.DictReader(f)) / 60)
    summary = workflow.evaluate_dataset("real", dirs, device="cpu")
    return {"plan": p, "splits": planned["splits"], "summary": summary, "minutes": minutes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--context-slices", default=None,
                    help="comma-separated neighbours per side to compare, e.g. 0,1 [the plan's default only]")
    ap.add_argument("--seeds", default=str(DEFAULT_SEED), help=f"comma-separated plan seeds [{DEFAULT_SEED}]")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    if not (REAL / "training").is_dir():
        sys.exit(f"real data not found at {REAL}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mslpipe-real-"))
    variants = [None] if args.context_slices is None else [int(v) for v in args.context_slices.split(",")]
    seeds = [int(v) for v in args.seeds.split(",")]
    runs = [cross_validate(work / (f"ctx{v}" if seed == DEFAULT_SEED else f"ctx{v}_seed{seed}"), v, seed,
                           args.epochs, args.iterations) for v in variants for seed in seeds]
    first = runs[0]
    p = first["plan"]
    folds = "; ".join(f"fold {k}: val {f['val']}" for k, f in enumerate(first["splits"]["folds"]))

    def label(r):
        return f"{r['plan'].input_channels} ({r['plan'].context_slices} per side)"

    compare = []
    for v in variants:
        mine = [r for r in runs if r["plan"].context_slices == (p.context_slices if v is None else v)]
        for r in mine:
            compare.append([label(r), r["plan"].seed, *(_r(r["summary"]["mean"][k]) for k in KEYS),
                            _r(r["summary"].get("isbi_score")), r["summary"]["postprocessing"]["min_lesion_mm3"],
                            " / ".join(f"{m:.1f}" for m in r["minutes"])])
        if len(mine) > 1:
            def mean(values):
                values = [x for x in values if x is not None]
                return sum(values) / len(values) if values else None

            compare.append([f"**{label(mine[0])}**", "**mean**",
                            *(_r(mean([r["summary"]["mean"][k] for r in mine])) for k in KEYS),
                            _r(mean([r["summary"].get("isbi_score") for r in mine])), "", ""])
    body = (f"Out-of-fold predictions, {len(first['minutes'])} leave-one-subject-out folds (seed {first['plan'].seed}: "
            f"{folds}; other seeds order the same folds differently). Network: {p.architecture} {p.arch_kwargs}, patch "
            f"{p.patch_size}, batch {p.batch_size}, {args.epochs} epochs × {args.iterations} iterations, SGD lr "
            f"{p.optimizer['lr']}. The seed sets the training's random draws (initialisation, sampling, "
            "augmentation). Input slices: the slice itself plus its neighbours on either side as channels (2.5D). "
            "Postprocessing (minimum lesion size) chosen on each run's own out-of-fold predictions.\n\n"
            + table(["input slices", "seed", *(f"mean {h}" for h in HEADERS), "ISBI score", "min lesion mm³",
                     "training-loop minutes per fold"], compare))
    keys = [(c["case"], c["rater"]) for c in first["summary"]["per_case"]]
    per_case = {id(r): {(c["case"], c["rater"]): c for c in r["summary"]["per_case"]} for r in runs}
    rows = [[f"{case} (rater {rater})", *(x for r in runs for x in (_r(per_case[id(r)][case, rater]["dice"]),
                                                                   _r(per_case[id(r)][case, rater]["lesion_f1"])))]
            for case, rater in keys]
    heads = [h for r in runs for h in (f"Dice {r['plan'].input_channels} sl. seed {r['plan'].seed}",
                                       f"lesion F1 {r['plan'].input_channels} sl. seed {r['plan'].seed}")]
    body += "\n\nPer scan and rater:\n\n" + table(["case", *heads], rows)
    print(body)
    write_section("real_data_cpu", "Real data, CPU plan, cross-validation", body)


if __name__ == "__main__":
    main()
