"""Cross-validation on the real MS scans with the CPU plan: what a 2-core machine can train.

Plans ../shared/data/real-ms-isbi with no held-out test set (4 subjects → leave-one-subject-out
folds; training03's three scans always stay together), trains every fold with the CPU plan's
narrow leaky_unet for a fixed number of epochs, then runs `evaluate` (out-of-fold predictions,
postprocessing chosen on them). Writes its section of bench/RESULTS.md. This measures the
pipeline on real data under a small compute budget; it is not the full-width GPU model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import plan, train, workflow  # noqa: E402
from mslpipe.plans import Workdirs  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402

REAL = real_data_path()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    if not (REAL / "training").is_dir():
        sys.exit(f"real data not found at {REAL}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mslpipe-real-"))
    dirs = Workdirs.resolve(work / "raw", work / "plans", work / "pre", work / "results")
    planned = plan.run("real", dirs, input_path=REAL, device="cpu", test_fraction=0)
    p = planned["plan"]
    minutes = []
    for k in range(len(planned["splits"]["folds"])):
        t0 = time.perf_counter()
        train.run("real", dirs, k, epochs=args.epochs, iterations=args.iterations, device="cpu",
                  show_progress=False, resume=(dirs.fold_dir("real", p.architecture, k) / "checkpoint_latest.pt")
                  .exists())
        minutes.append((time.perf_counter() - t0) / 60)
    summary = workflow.evaluate_dataset("real", dirs, device="cpu")
    keys = ["dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "abs_volume_diff_ml",
            "slice_dice_study"]
    rows = [[r["case"], *(round(r[k], 3) if r[k] is not None else "—" for k in keys)] for r in summary["per_case"]]
    rows.append(["**mean**", *(round(summary["mean"][k], 3) if summary["mean"][k] is not None else "—"
                               for k in keys)])
    folds = "; ".join(f"fold {k}: val {f['val']}" for k, f in enumerate(planned["splits"]["folds"]))
    body = (f"Out-of-fold predictions, {len(minutes)} leave-one-subject-out folds ({folds}). Network: "
            f"{p.architecture} {p.arch_kwargs}, patch {p.patch_size}, batch {p.batch_size}, {args.epochs} epochs × "
            f"{args.iterations} iterations, SGD lr {p.optimizer['lr']}; training minutes per fold: "
            f"{', '.join(f'{m:.1f}' for m in minutes)}. Postprocessing chosen on these predictions: "
            f"min lesion {summary['postprocessing']['min_lesion_mm3']} mm³. ISBI score "
            f"{summary.get('isbi_score')}.\n\n"
            + table(["case", "Dice", "IoU", "PPV", "TPR", "LTPR", "LFPR", "lesion F1", "|ΔV| mL", "slice Dice (study)"],
                    rows))
    print(body)
    write_section("real_data_cpu", "Real data, CPU plan, cross-validation", body)


if __name__ == "__main__":
    main()
