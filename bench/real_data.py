"""Real-data benchmark against nnU-Net v2: same data, same subject folds, same training minutes.

Three arms on mslpipe's subject-level folds of ../shared/data/real-ms-isbi (4 subjects: 4
leave-one-subject-out folds; training03's three scans always stay together):

* ``nnunet_2d``: nnU-Net's default ``2d`` configuration (its planner, preprocessing, PlainConvUNet,
  deep supervision, augmentation, sliding-window inference);
* ``nnunet_leaky_unet``: nnU-Net training mslpipe's ``leaky_unet`` (the plans from
  ``export-nnunet --nnunet-plans``: only the 2d configuration's network is replaced);
* ``mslpipe_leaky_unet``: mslpipe's own pipeline and network.

The first two against each other isolate what the network contributes; the last two what the pipeline
contributes. nnU-Net gets exactly mslpipe's folds through ``splits_final.json``. Each arm trains each fold
for the same wall-clock budget by the same rule (``--minutes-per-fold``, 3 by default; whole epochs while the
next one fits: nnU-Net through ``bench/nnunet/trainers``, mslpipe through ``mslpipe train --minutes``). Every arm's
predictions
are scored by ``mslpipe evaluate --pred --ref`` (the same metric code), per fold and pooled over folds;
nnU-Net's own validation summary.json is recorded beside it as a cross-check. Inference is timed end to
end per volume (process start, model loading, reading, writing included) with and without test-time
mirroring: nnU-Net's default and ``--disable_tta``, mslpipe's default and ``--tta``.

Results accumulate in ``bench/real_data_results.json`` (one entry per arm and fold, with the per-case rows
of `mslpipe evaluate`; a rerun replaces its own), so the folds and arms can be run in several calls, even on
different machines of the same kind: every run rewrites the table in bench/RESULTS.md from all entries,
pooled over folds once every fold of an arm is in. ``--smoke`` proves the wiring on the CPU (synthetic data unless
``--data``, fold 0, one tiny epoch per arm) and prints its numbers without writing RESULTS.md.

    bash bench/nnunet/setup.sh                                   # once: nnU-Net in bench/nnunet/.venv
    python bench/real_data.py --smoke                            # CPU wiring check, a few minutes
    python bench/real_data.py --device cuda --folds 0 --work /tmp/rd   # a GPU run; then --folds 1,2,3
"""

from __future__ import annotations

import argparse
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data_arms import ARMS, DEFAULT_ARMS, REPO, Setup, pool, run, run_arm  # noqa: E402

from mslpipe import nnunet_export, plan  # noqa: E402
from mslpipe.datasets import discover  # noqa: E402
from mslpipe.errors import MslpipeError  # noqa: E402
from mslpipe.io import read_json, write_json  # noqa: E402
from mslpipe.plans import Workdirs  # noqa: E402
from results import COMMIT_AT_START, machine, real_data_path, table, write_section  # noqa: E402

RESULTS_JSON = REPO / "bench" / "real_data_results.json"
SMOKE_ARCH = {"base_channels": 4, "max_channels": 32, "depth": 3}
SMOKE_OVERRIDES = {"arch_kwargs": SMOKE_ARCH, "batch_size": 4, "num_workers": 0, "inference_batch_size": 16}


def prepare(setup: Setup, data: Path, overrides: dict | None, arms: list[str]) -> dict:
    """mslpipe plan, export to nnU-Net, nnU-Net plan and preprocess, the patched plans (each once per work)."""
    w = setup.work / "mslpipe"
    dirs = Workdirs.resolve(w / "raw", w / "plans", w / "pre", w / "results")
    timings = {}
    if not (dirs.plan_dir(setup.name) / "splits.json").exists():
        t0 = time.perf_counter()
        plan.run(setup.name, dirs, input_path=data, device=setup.device, test_fraction=0, overrides=overrides)
        timings["mslpipe_plan_s"] = time.perf_counter() - t0
    full = setup.mslpipe_name("mslpipe_leaky_unet_full")
    if "mslpipe_leaky_unet_full" in arms and not (dirs.plan_dir(full) / "splits.json").exists():
        # the GPU plan's network width (leaky_unet's defaults), everything else as planned for this device
        plan.run(full, dirs, input_path=data, device=setup.device, test_fraction=0,
                 overrides={**(overrides or {}), "arch_kwargs": {}})
    raw = setup.work / "nnUNet_raw" / setup.nnunet_dataset
    pre = setup.work / "nnUNet_preprocessed" / setup.nnunet_dataset
    if not (raw / "dataset.json").exists():
        nnunet_export.run(setup.name, dirs, raw)
    # mslpipe-only runs (a GPU machine without nnU-Net's wheels) need the export's folds and file lists only
    if any(ARMS[a][0] == "nnunet" for a in arms):
        if not (pre / "nnUNetPlans.json").exists() or not (pre / "nnUNetPlans_2d").is_dir():
            timings["nnunet_plan_and_preprocess_s"] = run(
                [setup.nnunet("nnUNetv2_plan_and_preprocess"), "-d", str(setup.dataset_id), "-c", "2d",
                 "--verify_dataset_integrity", "-np", "1" if setup.device == "cpu" else "6"],
                setup, setup.work / "logs" / "plan_and_preprocess.log")
        shutil.copyfile(raw / "splits_final.json", pre / "splits_final.json")  # mslpipe's folds, whatever nnU-Net did
        arch_kwargs = read_json(dirs.plan_dir(setup.name) / "plans.json")["arch_kwargs"]
        nnunet_export.write_patched_plans(pre / "nnUNetPlans.json", arch_kwargs)
    setup.folds = read_json(raw / "splits_final.json")
    cases = {c.id: c for c in discover(raw)}
    source = {c.id: c for c in discover(read_json(dirs.plan_dir(setup.name) / "fingerprint.json")["source"])}
    setup.images = {cid: c.images["flair"] for cid, c in cases.items()}
    setup.raters = {cid: source[cid].masks for cid in cases}  # every rater's own mask, as evaluate expects
    return timings


def pooled(setup: Setup, entries: list[dict], key: str) -> dict | None:
    """All folds of one arm scored together, or None while a fold is missing (see :func:`pool_entries`)."""
    if {e["fold"] for e in entries} != set(range(len(setup.folds))):
        return None
    return pool_entries(entries, key)


def pool_entries(entries: list[dict], key: str) -> dict:
    """Entries' ``key`` inference scored together (each scan is in exactly one validation set), from the per-case
    rows `mslpipe evaluate` wrote, so earlier runs' folds need no files of theirs; seconds per volume as all the
    predict commands' seconds over all their volumes. ``rows`` and ``n_volumes`` come along."""
    rows = [row for e in entries for row in e["inference"][key]["scores"]["rows"]]
    n = sum(e["inference"][key]["n_volumes"] for e in entries)
    return {**pool(rows), "rows": rows, "n_volumes": n,
            "s_per_volume": sum(e["inference"][key]["wall_s"] for e in entries) / n}


def _v(x, digits=3):
    """A table cell: "—" for a missing or undefined number (a correlation over one scan is NaN)."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else round(x, digits) if isinstance(
        x, float) else x


def isbi_parts(rows: list[dict]) -> list:
    """The ISBI score's two parts, each averaged over raters: per-scan terms, volume correlation."""
    from mslpipe.metrics import isbi_score

    parts = [isbi_score([r for r in rows if r["rater"] == rater]) for rater in sorted({r["rater"] for r in rows})]
    return [_v(sum(p[k] for p in parts) / len(parts)) for k in ("partial", "volume_correlation")]


def fixed_epochs(entry: dict) -> bool:
    """Whether a run trained an epoch count fixed beforehand, not by the budget rule nnU-Net's trainer uses."""
    return "training" in entry and stopping(entry).endswith(" fixed")


def stopping(entry: dict) -> str:
    """How an entry's training ended: by the budget rule both systems share, or after a count fixed beforehand."""
    t = entry["training"]
    if entry.get("iterations") or t.get("stopping") == "one epoch":  # a brief run (--iterations): every arm alike
        return "one epoch"
    if entry["arm"].startswith("nnunet") or t.get("stopping", "").startswith("--minutes"):
        return "fits"
    return f"{t['planned_epochs']} fixed" if t.get("planned_epochs") else "one epoch"


def render(setup: Setup, results: dict, machine_note: str) -> str:
    entries = sorted(results["entries"], key=lambda e: (list(ARMS).index(e["arm"]), e["fold"]))
    score_rows, train_rows = [], []
    for arm in ARMS:
        mine = [e for e in entries if e["arm"] == arm]
        for key in ("tta", "no_tta"):
            for e in mine:
                s = e["inference"][key]["scores"]
                score_rows.append([arm, e["fold"], key, *(_v(s[k]) for k in ("dice", "iou", "lesion_f1", "ltpr",
                                   "lfpr", "isbi_score")), *isbi_parts(s["rows"]), _v(s["abs_volume_diff_ml"], 2),
                                   _v(e["inference"][key]["s_per_volume"], 2)])
            p = pooled(setup, mine, key) if mine else None
            if p:
                score_rows.append([f"**{arm}**", "pooled", key, *(_v(p[k]) for k in ("dice", "iou", "lesion_f1",
                                   "ltpr", "lfpr", "isbi_score")), *isbi_parts(p["rows"]),
                                   _v(p["abs_volume_diff_ml"], 2), _v(p["s_per_volume"], 2)])
        for e in mine:
            t = e["training"]
            own = t.get("nnunet_own_dice")
            cross = e.get("nnunet_validation_scored_by_mslpipe", {}).get("dice")
            train_rows.append([arm, e["fold"], _v(e["budget_min"]), stopping(e), t["epochs"], _v(t["s_per_epoch"], 1),
                               _v(t["time_to_best_s"], 0), _v(t["loop_s"] / 60, 2), _v(t["wall_s"] / 60, 2),
                               _v(own), _v(cross)])
    folds = "; ".join(f"fold {k}: val {', '.join(f['val'])}" for k, f in enumerate(setup.folds))
    budgets = " / ".join(f"{b:g}" for b in sorted({e["budget_min"] for e in entries}))
    return (
        f"Budget: {budgets} training minutes per fold and arm; card: {machine_note}. "
        f"Folds (by subject, identical for all arms): {folds}. Scores: `mslpipe evaluate --pred --ref` against "
        "every rater; ISBI score needs ≥ 2 scans (— otherwise). Seconds per volume: the whole predict command "
        "(process start and model loading included) divided by the volumes it segmented; `tta` is nnU-Net's "
        "default (mirroring) and mslpipe's `--tta`, `no_tta` nnU-Net's `--disable_tta` and mslpipe's default.\n\n"
        + "ISBI = per-scan part (mean of Dice/8 + PPV/8 + (1-LFPR)/4 + LTPR/4, at most 0.75) + volume "
        "correlation/4, the Pearson correlation of predicted and reference lesion volumes across the scans "
        "(per rater, then averaged): over the 3 scans of one patient (fold 0) it is a correlation of nearly equal "
        "volumes and swings the score by up to ±0.25, hence both parts and the mean absolute volume error (mL).\n\n"
        + table(["arm", "fold", "inference", "Dice", "IoU", "lesion F1", "LTPR", "LFPR", "ISBI", "ISBI per-scan",
                 "vol corr", "|Δvol| mL", "s/volume"], score_rows)
        + "\n\nTraining. Loop minutes: epochs with their validation (the budgeted part); wall minutes: the whole "
        "train command (start-up, nnU-Net's final validation or mslpipe's validation export included). Time to "
        "best: seconds from the first epoch to the end of the epoch each system's own selection metric peaked "
        "at. Own Dice: nnU-Net's validation summary.json; cross-check: the same predictions scored by mslpipe. "
        "Stopping: `fits` is nnU-Net's budget trainer and `mslpipe train --minutes` alike (whole epochs while the next "
        "one fits into the budget); `N fixed` is an epoch count set beforehand from another run's seconds per epoch "
        "(mslpipe before `--minutes`), which can overrun the budget by part of an epoch.\n\n"
        + table(["arm", "fold", "budget min", "stopping", "epochs", "s/epoch", "time to best s", "loop min",
                 "wall min",
                 "nnU-Net own Dice", "cross-check Dice"], train_rows)
        + throughput_table(entries) + goals(entries, n_folds=len(setup.folds)))


def throughput_table(entries: list[dict]) -> str:
    rows = [[e["arm"], e["fold"], e["throughput"]["inference"], e["throughput"]["n_volumes"],
             _v(e["throughput"]["wall_s"], 1), _v(e["throughput"]["s_per_volume"], 2)]
            for e in entries if "throughput" in e]
    if not rows:
        return ""
    return ("\n\nThroughput: each arm's default inference over every scan of the dataset in one predict command "
            "(the fold's model; speed only, since its training scans are among them), so start-up is spread over "
            "more volumes than a fold's validation scans.\n\n"
            + table(["arm", "fold", "inference", "volumes", "command s", "s/volume"], rows))


def goals(entries: list[dict], n_folds: int | None = None) -> str:
    """The issue's two goals, per fold where both systems ran: mslpipe's Dice at least nnU-Net 2d's (each with
    its default inference), and mslpipe's end-to-end seconds per volume at least 10x fewer than nnU-Net's default.
    With ``n_folds``, and every fold in for both, the same over all folds pooled (see :func:`pooled_goal`)."""
    by = {(e["arm"], e["fold"]): e for e in entries}
    lines = []
    both = sorted({f for a, f in by if a == "mslpipe_leaky_unet" and ("nnunet_2d", f) in by})
    for fold in both:
        m, n = by["mslpipe_leaky_unet", fold]["inference"]["no_tta"], by["nnunet_2d", fold]["inference"]["tta"]
        dm, dn = m["scores"]["dice"], n["scores"]["dice"]
        speed = n["s_per_volume"] / m["s_per_volume"]
        e = by["mslpipe_leaky_unet", fold]
        unequal = (f", but mslpipe trained {stopping(e)} epochs for {e['training']['loop_s'] / 60:.2f} of "
                   f"{e['budget_min']:g} minutes" if fixed_epochs(e) else "")
        line = (f"fold {fold}: Dice {dm:.3f} vs {dn:.3f} ({'met' if dm >= dn else 'NOT met'}{unequal}); "
                f"{speed:.1f}x faster per volume ({'met' if speed >= 10 else 'NOT met: goal 10x'})")
        tm, tn = e.get("throughput"), by["nnunet_2d", fold].get("throughput")
        if tm and tn:
            ratio = tn["s_per_volume"] / tm["s_per_volume"]
            line += (f", {ratio:.1f}x over all {tm['n_volumes']} scans in one command "
                     f"({'met' if ratio >= 10 else 'NOT met: goal 10x'})")
        lines.append(line)
    if not lines:
        return ""
    if n_folds is not None and both == list(range(n_folds)):
        lines.append(pooled_goal([by["mslpipe_leaky_unet", f] for f in both], [by["nnunet_2d", f] for f in both]))
    return ("\n\nGoals (mslpipe's default inference against nnU-Net 2d's default, mirroring on): "
            + "; ".join(lines) + ".")


def pooled_goal(mine: list[dict], theirs: list[dict]) -> str:
    """Both goals over every fold: Dice as the mean over all validation scans (each scan is in one fold), seconds
    per volume as all predict commands' seconds over all their volumes; and on how many folds each goal held."""
    pm, pn = pool_entries(mine, "no_tta"), pool_entries(theirs, "tta")
    dm, dn, speed = pm["dice"], pn["dice"], pn["s_per_volume"] / pm["s_per_volume"]
    m = [e["inference"]["no_tta"] for e in mine]
    n = [e["inference"]["tta"] for e in theirs]
    dice_folds = sum(a["scores"]["dice"] >= b["scores"]["dice"] for a, b in zip(m, n, strict=True))
    speed_folds = sum(b["s_per_volume"] >= 10 * a["s_per_volume"] for a, b in zip(m, n, strict=True))
    fixed = [e["fold"] for e in mine if fixed_epochs(e)]
    unequal = f", but mslpipe trained a fixed epoch count on fold(s) {', '.join(map(str, fixed))}" if fixed else ""
    return (f"pooled over all {len(m)} folds ({pm['n_volumes']} scans): Dice {dm:.3f} vs {dn:.3f} "
            f"({'met' if dm >= dn else 'NOT met'}{unequal}; met on {dice_folds} of {len(m)} folds); "
            f"{speed:.1f}x faster per volume ({'met' if speed >= 10 else 'NOT met: goal 10x'}; met on {speed_folds} "
            f"of {len(m)} folds)")


def parse_runs(text: str) -> list[tuple[int, str]]:
    """``"1:nnunet_leaky_unet,2:nnunet_2d"`` → [(1, "nnunet_leaky_unet"), (2, "nnunet_2d")]."""
    runs = []
    for item in (i.strip() for i in text.split(",")):
        fold, _, arm = item.partition(":")
        if not fold.strip().isdigit() or arm.strip() not in ARMS:
            sys.exit(f"--runs takes FOLD:ARM pairs with arms from {', '.join(ARMS)}, not {item!r}")
        runs.append((int(fold), arm.strip()))
    return runs


def merge_entries(results: dict, others: list[Path]) -> list[str]:
    """Add the entries of other runs' JSON files (e.g. the files several device calls brought back) to
    ``results``: an entry replaces the one of the same arm and fold, later files win. Returns what was added."""
    added = []
    for path in others:
        try:
            entries = read_json(path)["entries"]
            keys = [(e["arm"], e["fold"]) for e in entries]
        except MslpipeError as exc:
            sys.exit(str(exc))
        except (KeyError, TypeError) as exc:
            sys.exit(f"{path}: not a real-data results file (no {exc} in an entry)")
        for key, entry in zip(keys, entries, strict=True):
            old = [e for e in results["entries"] if (e["arm"], e["fold"]) == key]
            if old and old[0] == entry:
                continue
            results["entries"] = [e for e in results["entries"] if (e["arm"], e["fold"]) != key] + [entry]
            added.append(f"{key[0]} fold {key[1]} ({entry.get('commit', 'unrecorded')}) from {path}")
    return added


def render_speed(results: dict, machine_note: str) -> str:
    """The CPU speed table: seconds per volume of each arm's predict command, with and without TTA."""
    rows = []
    default = {e["fold"]: e["inference"]["tta"]["s_per_volume"] for e in results["entries"] if e["arm"] == "nnunet_2d"}
    for e in sorted(results["entries"], key=lambda e: (list(ARMS).index(e["arm"]), e["fold"])):
        for key, label in (("no_tta", "no"), ("tta", "yes")):
            inf = e["inference"][key]
            ratio = default[e["fold"]] / inf["s_per_volume"] if e["fold"] in default else None
            rows.append([e["arm"], e.get("network", "—"), label, e["fold"], inf["n_volumes"],
                         _v(inf["s_per_volume"], 1), _v(ratio, 2)])
    iterations = " / ".join(map(str, sorted({e.get("iterations") or 0 for e in results["entries"]})))
    folds = ", ".join(str(f) for f in sorted({e["fold"] for e in results["entries"]}))
    return (
        f"{machine_note}. Every arm was trained for one epoch of {iterations} iterations on this CPU (fold "
        f"{folds}): only speed is measured, "
        "so no scores are shown. Seconds per volume: the whole predict command (process start, model loading, "
        "reading, preprocessing, writing) divided by the volumes it segmented. TTA: nnU-Net's default is "
        "mirroring (`--disable_tta` turns it off); mslpipe's default is none (`--tta` adds 3 mirrored passes). "
        "nnU-Net runs its own planner's 2d configuration with `-npp 1 -nps 1`. `mslpipe_leaky_unet` is the "
        "network mslpipe plans for a CPU (narrowed); `mslpipe_leaky_unet_full` the full-width study network a "
        "GPU plan trains, run here on the CPU.\n\n"
        + table(["arm", "network (training patch, batch)", "TTA", "fold", "volumes", "s/volume",
                 "× faster than nnU-Net's default (with TTA)"], rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=None, help="ISBI-layout data [../shared/data/real-ms-isbi]")
    ap.add_argument("--work", type=Path, default=None, help="work folder; reuse it to add folds [a temporary one]")
    ap.add_argument("--device", default=None, choices=["cuda", "cpu"], help="[cuda; cpu with --smoke]")
    ap.add_argument("--minutes-per-fold", type=float, default=3.0)
    ap.add_argument("--folds", default=None, help="e.g. 0 or 0,1 or all [all; 1 with --cpu-speed]")
    ap.add_argument("--arms", default=None,
                    help=f"comma-separated subset of {', '.join(ARMS)} [{','.join(DEFAULT_ARMS)}]")
    ap.add_argument("--runs", default=None, metavar="FOLD:ARM,...",
                    help="these fold and arm pairs, in this order, instead of --folds x --arms (e.g. "
                         "1:nnunet_leaky_unet,2:nnunet_2d: what is left of a comparison in one device call)")
    ap.add_argument("--dataset-id", type=int, default=501, help="nnU-Net dataset id (DatasetNNN_NAME)")
    ap.add_argument("--nnunet-bin", type=Path, default=None,
                    help="folder with nnUNetv2_* [bench/nnunet/.venv/bin if there, else PATH]")
    ap.add_argument("--compile", action="store_true", help="torch.compile in every arm (nnUNet_compile=t)")
    ap.add_argument("--smoke", action="store_true", help="CPU wiring check: fold 0, one tiny epoch, no RESULTS.md")
    ap.add_argument("--cpu-speed", action="store_true",
                    help="CPU inference speed of briefly trained models (one epoch of --iterations); writes its own "
                         "section of bench/RESULTS.md [folds 1, arms nnunet_2d,mslpipe_leaky_unet,"
                         "mslpipe_leaky_unet_full]")
    ap.add_argument("--iterations", type=int, default=None,
                    help="train one epoch of this many iterations in every arm instead of a time budget "
                         "[3 with --smoke, 10 with --cpu-speed]")
    ap.add_argument("--results", type=Path, default=None,
                    help="the entries' JSON, kept across runs [bench/real_data_results.json; WORK/results.json "
                         "with --smoke]")
    ap.add_argument("--no-write", action="store_true", help="print the table only")
    ap.add_argument("--throughput", action="store_true",
                    help="also time each arm's default inference over every scan in one command (speed only)")
    ap.add_argument("--render-only", action="store_true",
                    help="train and predict nothing: rewrite the table in bench/RESULTS.md from --results (e.g. "
                    "after a device call that ran out of time once its arms' entries were written)")
    ap.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                    help="with --render-only: first add these runs' entries to --results (each replaces the entry "
                         "of its arm and fold; later files win), e.g. the real_data_results.json of each device call")
    args = ap.parse_args()
    if args.merge and not args.render_only:
        sys.exit("--merge goes with --render-only")

    venv_bin = REPO / "bench" / "nnunet" / ".venv" / "bin"
    nnunet_bin = args.nnunet_bin or (venv_bin if (venv_bin / "nnUNetv2_train").exists() else None)
    work = (args.work or Path(tempfile.mkdtemp(prefix="mslpipe-real-data-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    overrides = None
    if args.smoke:
        data, name, budget = args.data, "smoke", min(args.minutes_per_fold, 0.5)
        overrides = SMOKE_OVERRIDES
        if data is None:
            from mslpipe.synth import make_dataset

            data = work / "synthetic"
            if not data.exists():
                make_dataset(data, subjects=4, timepoints=1, shape=(40, 44, 32), seed=3, raters=1)
    else:
        data, name, budget = args.data or real_data_path(), "real", args.minutes_per_fold
        if not (Path(data) / "training").is_dir():
            sys.exit(f"real data not found at {data}")
    if args.cpu_speed and (args.smoke or args.device == "cuda"):
        sys.exit("--cpu-speed runs on the CPU with the real data: not with --smoke or --device cuda")
    device = args.device or ("cpu" if args.smoke or args.cpu_speed else "cuda")
    iterations = args.iterations or (3 if args.smoke else 10 if args.cpu_speed else None)
    runs = parse_runs(args.runs) if args.runs else None
    if runs and (args.folds or args.arms or args.smoke or args.cpu_speed):
        sys.exit("--runs replaces --folds and --arms, and goes with neither --smoke nor --cpu-speed")
    arms = list(dict.fromkeys(a for _, a in runs)) if runs else [a.strip() for a in (args.arms or ",".join(
        ("nnunet_2d", "mslpipe_leaky_unet", "mslpipe_leaky_unet_full") if args.cpu_speed else DEFAULT_ARMS)
    ).split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        sys.exit(f"unknown arms {unknown}; choose from {', '.join(ARMS)}")
    setup = Setup(work=work, name=name, dataset_id=args.dataset_id, device=device, budget_min=budget,
                  nnunet_bin=nnunet_bin, compile=args.compile,
                  iterations=iterations, speed_only=args.cpu_speed, throughput=args.throughput)
    if args.render_only:
        arms = []  # the folds come from mslpipe's plan (made here if the work folder lacks it), nothing runs
    timings = prepare(setup, Path(data), overrides, arms or ["mslpipe_leaky_unet"])
    print(f"work folder {work}; preparation {timings or 'reused'}", flush=True)
    folds_arg = args.folds or ("1" if args.cpu_speed else "all")
    folds = [] if args.render_only else [0] if args.smoke else (list(range(len(setup.folds))) if folds_arg == "all"
                                    else [int(f) for f in folds_arg.split(",")])
    runs = [] if args.render_only else runs or [(fold, arm) for fold in folds for arm in arms]
    bad = sorted({fold for fold, _ in runs if not 0 <= fold < len(setup.folds)})
    if bad:
        sys.exit(f"no fold {bad[0]}: the plan has folds 0-{len(setup.folds) - 1}")
    # The GPU comparison's entries are kept in the repository; smoke and CPU runs stay in their work folder.
    results_path = args.results or (work / "results.json" if args.smoke or device == "cpu" else RESULTS_JSON)
    results = read_json(results_path) if results_path.exists() else {"entries": []}
    if args.merge:
        added = merge_entries(results, args.merge)
        print("\n".join(["merged:", *added]) if added else "merged: nothing new", flush=True)
        write_json(results_path, results)
    from mslpipe.inference import pick_device

    for fold, arm in runs:
        t0 = time.perf_counter()
        print(f"fold {fold} {arm} ...", flush=True)
        entry = run_arm(setup, arm, fold)
        entry["device_name"] = pick_device_name(pick_device(device))
        entry["commit"] = COMMIT_AT_START
        results["entries"] = [e for e in results["entries"] if (e["arm"], e["fold"]) != (arm, fold)] + [entry]
        write_json(results_path, results)
        print(f"fold {fold} {arm}: {time.perf_counter() - t0:.0f} s, Dice (tta/no tta) "
              f"{entry['inference']['tta']['scores']['dice']} / {entry['inference']['no_tta']['scores']['dice']}",
              flush=True)
    cards = sorted({e["device_name"] for e in results["entries"]})
    commits = sorted({e.get("commit", "unrecorded") for e in results["entries"]})
    if args.cpu_speed:
        body = render_speed(results, ", ".join(cards))
        print(body)
        if not args.no_write:
            write_section("real_data_cpu_speed", "CPU inference: mslpipe vs nnU-Net v2, seconds per volume", body)
        return
    body = render(setup, results, ", ".join(cards) + f"; entries' commits: {', '.join(commits)}")
    print(body)
    if args.smoke or device == "cpu":
        print("\n(smoke or CPU run: nothing written to bench/RESULTS.md; the table is the GPU comparison's)")
    elif not args.no_write:
        if len(cards) > 1:
            print(f"warning: entries from several cards {cards}: the table says so")
        where = (f"rendered here ({machine()}) from the entries' own runs on {', '.join(cards)}"
                 if args.render_only else None)
        write_section("real_data", "Real data: mslpipe vs nnU-Net v2, same folds, same training minutes", body, where)


def pick_device_name(device: str) -> str:
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


if __name__ == "__main__":
    main()
