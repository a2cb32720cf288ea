"""N4's cost and effect per real scan: preprocessing seconds with and without it, and the field it divides out.

For each scan of ../shared/data/real-ms-isbi, on this machine's CPU: ``preprocess_volume`` (what ``plan`` and
``predict`` run per scan: reorient, brain mask, crop, normalise, slice) with the default plan's N4 (``n4_levels``
3) and with N4 off, median of ``--repeats`` after one warm-up; and the field N4 finds on the scan as acquired, as
its 1st and 99th percentiles over the brain (1.00 / 1.00 is no shading found; both sources are said to be
bias-corrected by their curators). Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import brainmask, datasets, preprocess  # noqa: E402
from mslpipe.intensity import correct_bias_n4  # noqa: E402
from mslpipe.plan import DEFAULT_N4_LEVELS  # noqa: E402
from mslpipe.plans import Plan  # noqa: E402
from results import real_data_path, table, write_section  # noqa: E402


def seconds(repeats: int, fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def cropped_brain(channel: np.ndarray, affine: np.ndarray, plan: Plan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scan reoriented and cropped to its brain box, the brain mask in that box and the voxel spacing: what
    ``preprocess_volume`` hands N4 (the scans here are at the plan's voxel size)."""
    ornt = preprocess.canonical_ornt(affine)
    canon = preprocess.to_canonical(channel, ornt)
    brain = brainmask.brain_mask(canon)
    sl = tuple(slice(a, b) for a, b in brainmask.bounding_box(brain, plan.crop_margin))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)[np.argsort(ornt[:, 0])]
    return canon[sl], brain[sl], spacing


def field_percentiles(channel: np.ndarray, affine: np.ndarray, plan: Plan) -> tuple[float, float]:
    """The 1st and 99th percentiles over the brain of the field N4 divides out of the scan as acquired (on the
    cropped brain, as ``preprocess_volume`` runs it)."""
    image, mask, spacing = cropped_brain(channel, affine, plan)
    lo = float(np.percentile(image[mask], 0.5))
    corrected = correct_bias_n4(image, mask, spacing, levels=int(plan.normalization["n4_levels"]))
    field = (image[mask] - lo) / np.maximum(corrected[mask] - lo, 1e-6)
    field = field[image[mask] - lo > 0]
    return tuple(float(v) for v in np.percentile(field, [1, 99]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    cases = datasets.discover(real_data_path())
    if not cases:
        sys.exit(f"real data not found at {real_data_path()}")
    off = Plan(dataset="bench", target_spacing=None)
    on = Plan(dataset="bench", target_spacing=None,
              normalization={**off.normalization, "n4_levels": DEFAULT_N4_LEVELS})
    rows, extra = [], []
    for case in cases:
        channels, affine, _ = preprocess.load_case(case)
        t_off = seconds(args.repeats, preprocess.preprocess_volume, channels, affine, off)
        t_on = seconds(args.repeats, preprocess.preprocess_volume, channels, affine, on)
        p1, p99 = field_percentiles(channels[0], affine, on)
        extra.append(t_on - t_off)
        rows.append([case.id, "×".join(map(str, channels[0].shape)), f"{t_off:.2f}", f"{t_on:.2f}",
                     f"{t_on - t_off:.2f}", f"{p1:.2f} / {p99:.2f}"])
        print(rows[-1], flush=True)
    body = (f"Each scan's `preprocess_volume` (what `plan` and `predict` run per scan) with N4 off and with the "
            f"default plan's N4 ({DEFAULT_N4_LEVELS} fitting levels), median of {args.repeats} after a warm-up; "
            "and the field N4 divides out of the scan as acquired, 1st / 99th percentile over the brain.\n\n"
            + table(["scan", "shape", "seconds, N4 off", "seconds, N4 on", "N4's seconds", "field p1 / p99"], rows)
            + f"\n\nN4's seconds per scan: median {statistics.median(extra):.2f}, largest {max(extra):.2f}.")
    print(body)
    write_section("n4_cost", "N4 bias-field correction: seconds and field per real scan (CPU)", body)


if __name__ == "__main__":
    main()
