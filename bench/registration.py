"""Rigid registration of two visits (`compare --register`) on the real scans, against known moves.

Each real FLAIR (and each later visit of a patient, against the visit before) is turned and shifted by a random
rigid move (rotations uniform in ±``--max-degrees`` about each axis, translations uniform in ±``--max-mm``, about
the volume's centre) and stored on a grid with another origin, as a second visit would be, with noise and an
intensity ramp added; its expert mask goes through the same move (nearest neighbour).
:func:`mslpipe.registration.register_rigid` then aligns the moved scan back to the original, and this records:

* **residual error**: how far the recovered transform, composed with the true move, leaves brain points from
  where they started (mean and largest over 2,000 brain voxels, mm); 0 is perfect;
* **lesion Dice back**: the moved expert mask mapped onto the original grid by
  :func:`mslpipe.registration.resample_mask`, against the original mask; beside it the same with the *true*
  inverse move, the loss that two resamplings of a 0/1 mask cause whatever the registration;
* **brain correlation** before and after, which `compare` warns about below 0.7;
* **seconds** per registration on this machine.

Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import registration  # noqa: E402
from mslpipe.io import load_image, numpy_to_sitk  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402


def random_move(rng: np.random.Generator, image, max_degrees: float, max_mm: float):
    import SimpleITK as sitk

    move = sitk.Euler3DTransform()
    move.SetCenter(image.TransformContinuousIndexToPhysicalPoint([s / 2 for s in image.GetSize()]))
    move.SetRotation(*(float(np.radians(v)) for v in rng.uniform(-max_degrees, max_degrees, 3)))
    move.SetTranslation(tuple(float(v) for v in rng.uniform(-max_mm, max_mm, 3)))
    return move


def resample(image, grid, transform, nearest: bool = False) -> np.ndarray:
    import SimpleITK as sitk

    out = sitk.Resample(image, grid, transform, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out).transpose(2, 1, 0)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return 2 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def one_case(data, affine, other, mask, rng, args) -> dict:
    """Register ``other`` (the same scan, or another visit on the same MNI grid), moved and made noisier, to
    ``data``; ``mask`` is ``other``'s expert mask on the shared grid."""
    image = numpy_to_sitk(data, affine)
    move = random_move(rng, image, args.max_degrees, args.max_mm)
    follow_affine = affine.copy()
    follow_affine[:3, 3] += rng.uniform(-20, 20, 3)  # another grid origin too
    grid = numpy_to_sitk(np.zeros(data.shape, np.float32), follow_affine)
    follow = resample(numpy_to_sitk(other, affine), grid, move)
    bright = float(np.percentile(follow[follow > 0], 99.5))
    ramp = 1.0 + args.bias * np.linspace(-1.0, 1.0, follow.shape[0])[:, None, None]  # a smooth bias field
    follow = follow * ramp + rng.normal(0.0, args.noise * bright, follow.shape) * (follow > 0)
    follow_mask = resample(numpy_to_sitk(mask, affine), grid, move, nearest=True)
    t0 = time.perf_counter()
    rigid = registration.register_rigid(data, affine, follow.astype(np.float32), follow_affine, seed=args.seed)
    seconds = time.perf_counter() - t0
    back = registration.resample_mask(follow_mask, follow_affine, data.shape, affine, rigid)
    exact = resample(numpy_to_sitk(follow_mask, follow_affine), numpy_to_sitk(mask, affine), move.GetInverse())
    brain = np.argwhere(data > 0.05 * np.percentile(data[data > 0], 99.5))
    points = brain[rng.choice(len(brain), size=min(2000, len(brain)), replace=False)]
    errors = []
    for ijk in points:
        p = image.TransformContinuousIndexToPhysicalPoint([float(v) for v in ijk])
        q = move.TransformPoint(rigid.transform.TransformPoint(p))
        errors.append(float(np.linalg.norm(np.subtract(q, p))))
    true_deg = np.degrees(move.GetParameters()[:3])
    return {"true_deg": true_deg, "true_mm": np.asarray(move.GetParameters()[3:]), "mean_err": float(np.mean(errors)),
            "max_err": float(np.max(errors)), "dice_back": dice(back, mask), "dice_exact": dice(exact >= 0.5, mask),
            "corr_before": rigid.correlation_before, "corr_after": rigid.correlation_after, "seconds": seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=real_data_path(), help="ISBI-layout real data")
    ap.add_argument("--moves", type=int, default=2, help="random moves per scan")
    ap.add_argument("--max-degrees", type=float, default=8.0)
    ap.add_argument("--max-mm", type=float, default=10.0)
    ap.add_argument("--seed", type=int, default=12345)
    ap.add_argument("--noise", type=float, default=0.03, help="Gaussian noise on the moved scan, × its bright end")
    ap.add_argument("--bias", type=float, default=0.1, help="linear intensity ramp ± this across the moved scan")
    ap.add_argument("--no-write", action="store_true", help="print, do not write RESULTS.md")
    args = ap.parse_args()
    scans = sorted(args.data.glob("training/*/preprocessed/*_flair_pp.nii*"))
    if not scans:
        sys.exit(f"no real scans under {args.data}")
    rng = np.random.default_rng(args.seed)
    rows, results = [], []
    loaded = {}
    for path in scans:
        case = path.name.split("_flair")[0]
        mask_path = next(path.parent.parent.glob(f"masks/{case}_mask1.nii*"))
        loaded[case] = (*load_image(path), load_image(mask_path)[0])
    # each scan against itself, then each later visit of a subject against the one before (MNI-registered, so
    # the true relation of the two is the identity up to that registration's own error)
    pairs = [(c, c) for c in loaded] + [(a, b) for a, b in zip(sorted(loaded), sorted(loaded)[1:], strict=False)
                                        if a.rsplit("_", 1)[0] == b.rsplit("_", 1)[0]]
    for base, other in pairs:
        data, affine, _ = loaded[base]
        for k in range(args.moves):
            r = one_case(data, affine, loaded[other][0], loaded[other][2], rng, args)
            results.append({**r, "visits": base != other})
            rows.append([base if base == other else f"{other} → {base}", k + 1,
                         ", ".join(f"{v:+.1f}" for v in r["true_deg"]),
                         ", ".join(f"{v:+.1f}" for v in r["true_mm"]), round(r["mean_err"], 2),
                         round(r["max_err"], 2), round(r["dice_back"], 3), round(r["dice_exact"], 3),
                         f"{r['corr_before']:.2f} → {r['corr_after']:.2f}", round(r["seconds"], 1)])
            print(rows[-1], flush=True)

    def med(key, visits=None):
        return float(np.median([r[key] for r in results if visits is None or r["visits"] == visits]))

    body = (
        f"Each of the {len(scans)} real scans, and each later visit of training03 (another scan of the same "
        f"patient: lesions and intensities changed), turned and shifted by {args.moves} random rigid moves "
        f"(rotations uniform in ±{args.max_degrees:g}° about each axis, translations in ±{args.max_mm:g} mm, on a "
        f"grid with another origin), with Gaussian noise of {args.noise:g}× its bright end and a linear intensity "
        f"ramp of ±{args.bias:g} added, then registered back to the scan (or earlier visit) by "
        "`mslpipe.registration.register_rigid` (what `compare --register` runs). The visits are MNI-registered, so "
        "their true relation is the identity up to that registration's own error, which their residuals include. "
        "Residual: distance between where the recovered transform composed with the true move puts 2,000 "
        "brain points and where they started. Lesion Dice back: the moved expert mask mapped back by "
        "`resample_mask`, against the original; exact: the same through the true inverse move (what two "
        "resamplings of a 0/1 mask lose whatever the registration). See `bench/registration.py`.\n\n"
        + table(["scan", "move", "true rotation °", "true translation mm", "residual mean mm", "residual max mm",
                 "lesion Dice back", "lesion Dice back, exact inverse", "brain correlation", "s"], rows)
        + "".join(f"\n\nMedians over the {sum(r['visits'] == v for r in results)} registrations of {what}: "
                  f"residual {med('mean_err', v):.2f} mm mean, {med('max_err', v):.2f} mm largest; lesion Dice back "
                  f"{med('dice_back', v):.3f} (exact inverse {med('dice_exact', v):.3f}); {med('seconds', v):.1f} s "
                  "per registration."
                  for v, what in ((False, "a scan to itself"), (True, "a later visit to the one before"))
                  if any(r["visits"] == v for r in results))
        + f" Worst residual over all: {max(r['max_err'] for r in results):.2f} mm.\n")
    print(body)
    if not args.no_write:
        print("wrote", write_section("registration", "Rigid registration of two visits (real data)", body))


if __name__ == "__main__":
    main()
