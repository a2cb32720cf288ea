"""Write a benchmark's section of bench/RESULTS.md: card, date, commit and the numbers, by script.

Each script owns one section between markers and replaces only that section, so numbers are never
typed by hand and a rerun updates its own table in place.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
HEADER = ("# Benchmark results\n\nEvery number below is written by the script named in its section "
          "(`python bench/NAME.py`), with the card, date and commit it ran on. Do not edit by hand.\n")


def real_data_path() -> Path:
    """The real MS scans: $MSLPIPE_REAL_DATA, else ../shared/data/real-ms-isbi beside the checkout."""
    default = RESULTS.parents[2] / "shared" / "data" / "real-ms-isbi"
    return Path(os.environ.get("MSLPIPE_REAL_DATA", default))


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda}, torch {torch.__version__})"
        threads = torch.get_num_threads()
        tv = torch.__version__
    except ImportError:  # pragma: no cover
        threads, tv = os.cpu_count(), "n/a"
    cpu = platform.processor() or platform.machine()
    return f"CPU only: {cpu}, {os.cpu_count()} cores visible, {threads} torch threads (torch {tv})"


DIRTY = "+uncommitted changes"  # the commit stamp's suffix for a checkout with changes no commit holds


def commit() -> str:
    """HEAD's short hash (+ a flag for uncommitted changes); $MSLPIPE_COMMIT where there is no git (device copies)."""
    if os.environ.get("MSLPIPE_COMMIT"):
        return os.environ["MSLPIPE_COMMIT"]
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=RESULTS.parent, check=True).stdout.strip()
        # the whole checkout but RESULTS.md itself (which earlier runs rewrite), from its top; a new file that git
        # does not ignore counts too (a benchmark script not yet committed is code no commit holds)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ":(top)",
                                ":(top,exclude)bench/RESULTS.md"], capture_output=True,
                               text=True, cwd=RESULTS.parent).stdout.strip()
        return sha + (DIRTY if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


COMMIT_AT_START = None  # set on import: the code that ran, not what is checked out when results are written


def table(headers: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, title: str, body: str, where: str | None = None) -> Path | None:
    """Replace (or append) the section ``name`` of RESULTS.md, atomically. ``where`` replaces this machine's
    description in the stamp, for a table rendered from entries measured elsewhere.

    Numbers from code that no commit holds cannot be traced, so a run that started with uncommitted changes
    writes nothing (it says so on standard error and returns None) unless $MSLPIPE_ALLOW_DIRTY is set; the
    scripts' work folders keep what they trained, so a rerun from a clean commit costs little."""
    if COMMIT_AT_START.endswith(DIRTY) and not os.environ.get("MSLPIPE_ALLOW_DIRTY"):
        print(f"bench/RESULTS.md: section {name!r} not written: the run started from {COMMIT_AT_START}; commit "
              "(or run from a clean worktree) and rerun with the same --work", file=sys.stderr)
        return None
    stamp = (f"_{where or machine()}; {_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC; "
             f"commit {COMMIT_AT_START}; `python bench/{Path(sys.argv[0]).name} {shlex.join(sys.argv[1:])}`_")
    section = f"<!-- BEGIN {name} -->\n## {title}\n\n{stamp}\n\n{body.strip()}\n<!-- END {name} -->\n"
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + section
    tmp = RESULTS.with_suffix(".md.tmp")
    tmp.write_text(text)
    os.replace(tmp, RESULTS)
    return RESULTS


def score_checkpoint(pre_dir: Path, checkpoint: Path | list[Path], cases: list[str], degrade=None,
                     tta: bool = False) -> dict[str, tuple[float, float]]:
    """{case: (volume Dice, lesion F1)} of one checkpoint (a list: their averaged probabilities, as ``predict``
    ensembles folds) on preprocessed scans (each passed through ``degrade`` first, if given), on the CPU, without
    postprocessing; ``tta``: averaged over the mirrored inputs."""
    from mslpipe import data_loading, inference, metrics

    predictor = inference.load_predictor(checkpoint if isinstance(checkpoint, list) else [checkpoint], device="cpu")
    p, out = predictor.plan, {}
    for case in cases:
        image, seg, _ = data_loading.load_case_arrays(pre_dir, case)
        prob = inference.predict_volume(predictor.models, degrade(image) if degrade else image,
                                        divisor=predictor.divisor, device="cpu", batch_size=p.inference_batch_size,
                                        context=p.context_slices, tta=tta)
        out[case] = (float(metrics.dice(prob >= 0.5, seg >= 0.5)), float(metrics.lesion_f1(prob >= 0.5, seg >= 0.5)))
    return out


def real_data_work(work: Path | None, prefix: str) -> Path:
    """The fold benchmarks' work folder (``--work``, else a new temporary one); exits when the real data is absent."""
    if not (real_data_path() / "training").is_dir():
        sys.exit(f"real data not found at {real_data_path()}")
    return work or Path(tempfile.mkdtemp(prefix=prefix))


def seed_dirs(base: Path, seed: int):
    """The work folders of one plan seed's runs: ``base/seed<seed>/{raw,plans,pre,results}``."""
    from mslpipe.plans import Workdirs

    base = base / f"seed{seed}"
    return Workdirs.resolve(base / "raw", base / "plans", base / "pre", base / "results")


def _same(a, b) -> bool:
    """Plan values alike: equal (tuples as lists), or both off (absent, 0, None, False: an option that was off
    before it had a field, as plans planned before N4 have no ``n4_levels``)."""
    def norm(v):
        return list(v) if isinstance(v, tuple) else v
    return norm(a) == norm(b) or (not a and not b)


def _dotted(overrides: dict) -> dict:
    """Plan overrides as dotted names: a whole section given as a dict (or dataclass) becomes one name per key."""
    out = {}
    for k, v in overrides.items():
        v = dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
        if isinstance(v, dict):
            out.update({f"{k}.{name}": value for name, value in _dotted(v).items()})
        else:
            out[k] = v
    return out


def plan_fields(path: Path) -> dict:
    """A plans.json as {dotted name: value} (``normalization.scheme``, ...)."""
    from mslpipe.io import read_json

    return _dotted(read_json(path))


def plan_drift(base: Path, other: Path, keys=()) -> list[str]:
    """The fields in which plans.json ``other`` differs from ``base``, but for ``keys`` (an arm's own overrides)
    and the hash: what makes two arms differ in more than the benchmark says, as when an arm's folds reused from
    an older run were planned under older defaults."""
    a, b = plan_fields(base), plan_fields(other)
    skip = {"hash", *keys}
    return [f"{k}: {a.get(k, 'absent')} against {b.get(k, 'absent')}" for k in sorted(set(a) | set(b))
            if k not in skip and not _same(a.get(k), b.get(k))]


def planned(dirs, seed: int, overrides: dict | None = None, groups: Path | None = None) -> Path:
    """The plans.json of the real data planned for the CPU in ``dirs`` (leave one subject out, or one group of
    ``groups`` out as `plan --groups`, with ``overrides``), planned unless already there (a rerun reuses it,
    whatever commit planned it, but only when it holds ``overrides``: otherwise this stops with the differences)."""
    from mslpipe import plan

    plans = dirs.plan_dir("real") / "plans.json"
    if (dirs.plan_dir("real") / "splits.json").exists():
        held = plan_fields(plans)
        wrong = [f"{k}: {held.get(k, 'absent')} in the plan, {v} asked" for k, v in _dotted(overrides or {}).items()
                 if not _same(held.get(k), v)]
        if wrong:
            sys.exit(f"{plans} was planned otherwise than asked ({'; '.join(wrong)}): another work folder, "
                     "or remove it to plan afresh")
    else:
        overrides = dict(overrides or {})
        axis = overrides.pop("slice_axis", 2)  # plan's own argument: the patch follows it
        plan.run("real", dirs, input_path=real_data_path(), device="cpu", test_fraction=0, seed=seed,
                 overrides=overrides, slice_axis=axis, groups=groups)
    return plans


def check_arm(first: Path, dirs, seed: int, overrides: dict, own, label: str) -> None:
    """Plan (or reuse) an arm in ``dirs`` with ``overrides`` (:func:`planned`), and stop, naming the fields, unless
    its plan differs from plans.json ``first`` in the arm's ``own`` settings only (:func:`plan_drift`): called for
    every arm before any training."""
    drift = plan_drift(first, planned(dirs, seed, overrides), own)
    if drift:
        sys.exit(f"the arm {label!r} (seed {seed}) differs from the first in more than its own settings: "
                 + "; ".join(drift))


def trained_fold(dirs, seed: int, fold: int, epochs: int, iterations: int, overrides: dict | None = None,
                 groups: Path | None = None) -> Path:
    """Fold ``fold`` of the real data :func:`planned` (with ``overrides`` and ``groups``) and trained, unless
    already there (a rerun reuses it, whatever commit trained it)."""
    from mslpipe import train

    planned(dirs, seed, overrides, groups)
    fold_dir = dirs.fold_dir("real", "leaky_unet", fold)
    if not (fold_dir / "checkpoint_final.pt").exists():
        train.run("real", dirs, fold, epochs=epochs, iterations=iterations, device="cpu", show_progress=False,
                  resume=(fold_dir / "checkpoint_latest.pt").exists())
    return fold_dir


def trained_folds(args, work: Path, overrides: dict | None = None):
    """``(seed, fold, dirs, fold_dir)`` for each seed and fold that :func:`fold_arguments` parsed, trained (with the
    plan ``overrides``)."""
    seeds = args.seeds.split(",") if hasattr(args, "seeds") else [args.seed]
    for seed in (int(s) for s in seeds):
        dirs = seed_dirs(work, seed)
        for fold in (int(k) for k in args.folds.split(",")):
            yield seed, fold, dirs, trained_fold(dirs, seed, fold, args.epochs, args.iterations, overrides)


def fold_arguments(ap, several_seeds: bool = False) -> None:
    """The real-data fold benchmarks' shared options: schedule, plan seed(s), folds and a reusable work folder."""
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iterations", type=int, default=40)
    if several_seeds:
        ap.add_argument("--seeds", default="12345", help="comma-separated plan seeds [12345]")
    else:
        ap.add_argument("--seed", type=int, default=12345, help="plan seed [12345]")
    ap.add_argument("--folds", default="0,1,2,3", help="comma-separated folds [0,1,2,3]")
    ap.add_argument("--work", type=Path, default=None, help="work folder; a rerun reuses trained folds")


COMMIT_AT_START = commit()
