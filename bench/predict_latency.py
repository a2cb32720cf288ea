"""One scan, the whole ``mslpipe predict`` command: the first scan read while the models load, against after.

A user with one patient waits for the whole command: the process start, torch's import, the models' loading and
then the scan's reading and preprocessing (N4 included) before the network. mslpipe starts reading and
preprocessing the first scan beside torch's import and the models' loading (``predict.start_first_read``). This
times, in a new process per run, the command on one real scan with that head start (the default) and without it
(the same code with ``predict.start_first_read`` replaced by one that starts nothing: the order before it), the
two alternating, median of ``--repeats`` after one warm-up run of each. Scans: by default training01_01 (N4 finds
no field and stops at once) and training04_01 (N4's slowest real scan). The model: a fold trained briefly on the
real data (speed only), or ``--checkpoint`` (a fold's ``checkpoint_final.pt`` with its ``plan.json`` beside it).
Writes its section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mslpipe import datasets  # noqa: E402
from mslpipe.plans import load_plan  # noqa: E402
from results import real_data_path, real_data_work, seed_dirs, table, trained_fold, write_section  # noqa: E402

RUN = """import sys
from mslpipe import predict
from mslpipe.cli import main
if sys.argv[1] == "after":
    predict.start_first_read = lambda *args, **kwargs: None
sys.argv = ["mslpipe", *sys.argv[2:]]
main()
"""
ARMS = {"after the models load": "after", "while they load (default)": "while"}


def command_seconds(arm: str, scan_dir: Path, checkpoint: Path, out: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", RUN, arm, "predict", "-i", str(scan_dir), "-o", str(out), "--checkpoint",
                    str(checkpoint), "--device", "cpu", "--overwrite"], check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scans", default="training01_01,training04_01")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="work folder for the briefly trained fold")
    args = ap.parse_args()
    work = real_data_work(args.work, "mslpipe-latency-")
    checkpoint = args.checkpoint or trained_fold(seed_dirs(work, 12345), 12345, 0, 1, 2) / "checkpoint_final.pt"
    plan = load_plan(checkpoint.parent / "plan.json")
    cases = {c.id: c for c in datasets.discover(real_data_path())}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.scans.split(","):
            scan_dir = Path(tmp) / name
            scan_dir.mkdir()
            (scan_dir / f"{name}.nii.gz").symlink_to(Path(cases[name].images[plan.channels[0]]).resolve())
            times = {arm: [] for arm in ARMS.values()}
            for k in range(args.repeats + 1):
                for arm in ARMS.values():
                    seconds = command_seconds(arm, scan_dir, checkpoint, Path(tmp) / f"out_{arm}")
                    if k:  # the first of each is the warm-up
                        times[arm].append(seconds)
            after, during = (statistics.median(times[arm]) for arm in ARMS.values())
            rows.append([name, f"{after:.2f}", f"{during:.2f}", f"{after - during:.2f}"])
            print(rows[-1], flush=True)
    body = (f"The whole `mslpipe predict` command on one real scan, a new process per run, on this machine's CPU: "
            f"the first scan read and preprocessed after torch and the models load (the order before), against "
            f"while they load (mslpipe's default); median of {args.repeats} after a warm-up, the two alternating. "
            f"Model: {plan.architecture} {plan.arch_kwargs}, {plan.input_channels} input slices, the default plan's "
            f"N4 ({plan.normalization.get('n4_levels', 0)} levels), one fold (speed only; see "
            "`bench/predict_latency.py`).\n\n"
            + table(["scan", *(f"seconds, read {arm}" for arm in ARMS), "saved"], rows))
    print(body)
    write_section("predict_latency", "One scan, the whole predict command: reading beside the models' loading (CPU)",
                  body)


if __name__ == "__main__":
    main()
