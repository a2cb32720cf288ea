"""Robustness to coarser scans: the CPU plan trained with and without simulated low resolution.

mslpipe will segment scans from scanners it never saw, often coarser than ISBI's 1 mm MNI volumes. This trains
fold 0 of ../shared/data/real-ms-isbi (which subject it validates on depends on the plan's seed: training03's
3 scans for 12345, training01_01 for 7) with the CPU plan twice per seed, once
with ``augmentation.p_low_res`` 0 and once with the planner's default (nnU-Net's simulated low resolution), and
scores each final model on the validation volumes as they are and degraded on the preprocessed grid:

* ``in-plane 2 mm``: each axial slice block-averaged 2×2 and interpolated back (a coarser in-plane matrix);
* ``axial 3 mm``: every 3 axial slices averaged and interpolated back along the slice axis (thick slices).

Volume Dice and lesion F1 of the final checkpoint (no postprocessing), against the expert mask. Writes its
section of bench/RESULTS.md after each run. Small-sample numbers: one fold, one or two seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import plan, train  # noqa: E402
from mslpipe.io import read_json  # noqa: E402
from mslpipe.plans import Augmentation, Workdirs, load_plan  # noqa: E402
from results import real_data_path, score_checkpoint, table, trained_fold, write_section  # noqa: E402

REAL = real_data_path()


def inplane_2mm(image: np.ndarray) -> np.ndarray:
    """S×C×H×W: every slice block-averaged 2×2, then linearly interpolated back to H×W."""
    out = np.empty_like(image)
    h, w = image.shape[2:]
    for s in range(image.shape[0]):
        for c in range(image.shape[1]):
            small = ndimage.uniform_filter(image[s, c], 2)[::2, ::2]
            out[s, c] = ndimage.zoom(small, (h / small.shape[0], w / small.shape[1]), order=1)[:h, :w]
    return out


def axial_3mm(image: np.ndarray, k: int = 3) -> np.ndarray:
    """S×C×H×W: blocks of k slices averaged, then linearly interpolated back along S."""
    n = image.shape[0] // k * k
    blocks = image[:n].reshape(n // k, k, *image.shape[1:]).mean(1)
    up = ndimage.zoom(blocks, (image.shape[0] / blocks.shape[0], 1, 1, 1), order=1)
    return np.ascontiguousarray(up[:image.shape[0]])


DEGRADE = {"as acquired": lambda x: x, "in-plane 2 mm": inplane_2mm, "axial 3 mm": axial_3mm}


def run_variant(work: Path, p_low_res: float, seed: int, epochs: int, iterations: int) -> dict:
    dirs = Workdirs.resolve(work / "raw", work / "plans", work / "pre", work / "results")
    fold_dir = trained_fold(dirs, seed, 0, epochs, iterations,
                            {"augmentation": dataclasses.replace(Augmentation(), p_low_res=p_low_res)})
    plan_dir = dirs.plan_dir("real")
    val = train.fold_cases(read_json(plan_dir / "splits.json"), read_json(plan_dir / "fingerprint.json"), 0).val
    scores = {name: tuple(float(v) for v in np.mean(list(score_checkpoint(
        dirs.preprocessed_dir("real"), fold_dir / "checkpoint_final.pt", val, degrade).values()), axis=0))
        for name, degrade in DEGRADE.items()}
    p = load_plan(fold_dir / "plan.json")
    return {"p_low_res": p.augmentation.p_low_res, "seed": seed, "val": val, "scores": scores, "net": p.arch_kwargs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--seeds", default="12345", help="comma-separated plan seeds [12345]")
    ap.add_argument("--work", type=Path, default=None, help="work folder; a rerun reuses finished models")
    args = ap.parse_args()
    if not (REAL / "training").is_dir():
        sys.exit(f"real data not found at {REAL}")
    work = args.work or Path(tempfile.mkdtemp(prefix="mslpipe-lowres-"))
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for p_low_res in (0.0, plan.DEFAULT_P_LOW_RES):
            r = run_variant(work / f"seed{seed}_p{p_low_res:g}", p_low_res, seed, args.epochs, args.iterations)
            clean = r["scores"]["as acquired"][0]
            rows.append([r["p_low_res"], r["seed"], ", ".join(r["val"]),
                         *(f"{d:.3f} / {f:.3f}" for d, f in r["scores"].values()),
                         *(f"{r['scores'][k][0] - clean:+.3f}" for k in ("in-plane 2 mm", "axial 3 mm"))])
            body = (f"CPU plan (leaky_unet {r['net']}), "
                    f"fold 0 of each seed's split, {args.epochs} epochs × {args.iterations} iterations, "
                    "final checkpoint, no postprocessing. Cells: volume Dice / lesion F1, mean over the validation "
                    "scans; the degraded scans are the same volumes made coarser on the preprocessed grid (see "
                    "`bench/robustness_lowres.py`). One fold: small-sample numbers.\n\n"
                    + table(["p_low_res", "seed", "validation scans", *DEGRADE, "Dice change, in-plane 2 mm",
                             "Dice change, axial 3 mm"],
                            rows))
            print(body, flush=True)
            write_section("robustness_lowres", "Robustness to coarser scans (CPU plan, real data)", body)


if __name__ == "__main__":
    main()
