"""The three arms of bench/real_data.py: how each one trains, predicts and is timed (helpers only)."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TRAINER = "nnUNetTrainerBudget"
ARMS = {
    # arm name: (system, nnU-Net plans name, or the suffix of mslpipe's dataset name)
    "nnunet_2d": ("nnunet", "nnUNetPlans"),
    "nnunet_leaky_unet": ("nnunet", "nnUNetPlans_leaky_unet"),
    "mslpipe_leaky_unet": ("mslpipe", ""),
    # CPU speed only: the full-width network a GPU plan trains, planned and run on the CPU. On a GPU the
    # plain arm already is full width.
    "mslpipe_leaky_unet_full": ("mslpipe", "_full"),
}
DEFAULT_ARMS = ("nnunet_2d", "nnunet_leaky_unet", "mslpipe_leaky_unet")


@dataclass
class Setup:
    """Everything the arms share: folders, environment, device and budget."""

    work: Path
    name: str
    dataset_id: int
    device: str
    budget_min: float
    nnunet_bin: Path | None
    compile: bool
    iterations: int | None = None  # brief training: one epoch of this many iterations in every arm, no budget
    speed_only: bool = False  # skip nnU-Net's final validation (its scores are not wanted)
    throughput: bool = False  # also time each arm's default inference over every scan in one command
    folds: list[dict] = field(default_factory=list)  # nnU-Net splits_final.json (case ids)
    raters: dict[str, list[Path]] = field(default_factory=dict)  # case -> reference masks
    images: dict[str, Path] = field(default_factory=dict)  # case -> FLAIR image (the export's copy)

    @property
    def nnunet_dataset(self) -> str:
        return f"Dataset{self.dataset_id:03d}_{self.name}"

    def mslpipe_name(self, arm: str) -> str:
        return self.name + ARMS[arm][1]

    def mslpipe_globals(self, results: Path | None = None) -> list[str]:
        w = self.work / "mslpipe"
        return ["--raw", str(w / "raw"), "--plans", str(w / "plans"), "--preprocessed", str(w / "pre"),
                "--results", str(results or w / "results")]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(nnUNet_raw=str(self.work / "nnUNet_raw"), nnUNet_preprocessed=str(self.work / "nnUNet_preprocessed"),
                   nnUNet_results=str(self.work / "nnUNet_results"),
                   nnUNet_extTrainer=str(REPO / "bench" / "nnunet" / "trainers"),
                   nnUNet_compile="t" if self.compile else "f",
                   MSLPIPE_BUDGET_MINUTES=str(self.budget_min), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
        if self.device == "cpu":  # nnU-Net's defaults start 8 worker processes: too many for 2 cores
            env.update(nnUNet_def_n_proc="1", nnUNet_n_proc_DA="1")
        if self.iterations:
            env.update(MSLPIPE_NNUNET_ITERATIONS=str(self.iterations), MSLPIPE_NNUNET_MAX_EPOCHS="1")
        if self.speed_only:
            env.update(MSLPIPE_NNUNET_SKIP_VALIDATION="1")
        return env

    def nnunet(self, tool: str) -> str:
        if self.nnunet_bin is not None:
            return str(self.nnunet_bin / tool)
        found = shutil.which(tool)
        if found is None:
            sys.exit(f"{tool} not found: run bash bench/nnunet/setup.sh or give --nnunet-bin")
        return found


def run(cmd: list[str], setup: Setup, log: Path) -> float:
    """Run ``cmd`` with the benchmark's environment, its output to ``log``; return the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=setup.env(), cwd=setup.work)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text(errors="replace")[-3000:]
        raise RuntimeError(f"{cmd[0]} … failed ({proc.returncode}); end of {log}:\n{tail}")
    return seconds


def mslpipe(*args: str) -> list[str]:
    return [sys.executable, "-m", "mslpipe", *args]


# ---------------------------------------------------------------------------- folders of cases
def link_folder(folder: Path, files: dict[str, Path]) -> Path:
    """A fresh folder of symbolic links ``name -> file``."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for name, target in files.items():
        (folder / name).symlink_to(Path(target).resolve())
    return folder


def refs_folder(setup: Setup, cases: list[str], folder: Path) -> Path:
    return link_folder(folder, {f"{c}_mask{r + 1}.nii.gz": m for c in cases for r, m in enumerate(setup.raters[c])})


def score(setup: Setup, pred: Path, ref: Path, out: Path) -> dict:
    """Score with `mslpipe evaluate --pred --ref` (the same metric code for every arm)."""
    run(mslpipe("evaluate", "--pred", str(pred), "--ref", str(ref), "-o", str(out)), setup, out.with_suffix(".log"))
    summary = json.loads(out.read_text())
    keep = ("dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "abs_volume_diff_ml")
    return {**{k: summary["mean"].get(k) for k in keep}, "isbi_score": summary.get("isbi_score"),
            "n_cases": summary["n_cases"], "rows": summary["per_case"]}


def pool(rows: list[dict]) -> dict:
    """Scores of several folds' (case, rater) rows together: means over rows, ISBI per rater then averaged."""
    import math

    from mslpipe.metrics import isbi_score

    keep = ("dice", "iou", "precision", "recall", "ltpr", "lfpr", "lesion_f1", "abs_volume_diff_ml")
    out: dict = {k: (sum(v) / len(v) if (v := [r[k] for r in rows if r.get(k) is not None]) else None)
                 for k in keep}
    isbi = [isbi_score([r for r in rows if r["rater"] == rater])["score"] for rater in {r["rater"] for r in rows}]
    isbi = [v for v in isbi if not math.isnan(v)]
    out["isbi_score"] = sum(isbi) / len(isbi) if isbi else None
    out["n_cases"] = len({r["case"] for r in rows})
    return out


# ---------------------------------------------------------------------------- nnU-Net
def nnunet_fold_dir(setup: Setup, plans: str, fold: int) -> Path:
    return (setup.work / "nnUNet_results" / setup.nnunet_dataset / f"{TRAINER}__{plans}__2d" / f"fold_{fold}")


def train_nnunet(setup: Setup, plans: str, fold: int, logs: Path) -> dict:
    fold_dir = nnunet_fold_dir(setup, plans, fold)
    shutil.rmtree(fold_dir, ignore_errors=True)
    wall = run([setup.nnunet("nnUNetv2_train"), str(setup.dataset_id), "2d", str(fold), "-tr", TRAINER, "-p", plans,
                "-device", setup.device], setup, logs / "train.log")
    budget = json.loads((fold_dir / "budget_log.json").read_text())
    secs = budget["epoch_seconds"]
    out = {"wall_s": wall, "epochs": budget["epochs"], "s_per_epoch": sorted(secs)[len(secs) // 2],
           "loop_s": budget["loop_seconds"], "time_to_best_s": budget["time_to_best_s"],
           "best_epoch": budget["best_epoch"], "selection": "EMA pseudo Dice on patches (nnU-Net)",
           "batch_size": budget["batch_size"], "patch_size": budget["patch_size"]}
    if not setup.speed_only:
        own = json.loads((fold_dir / "validation" / "summary.json").read_text())
        out.update(nnunet_own_dice=own["foreground_mean"]["Dice"], validation_dir=str(fold_dir / "validation"))
    return out


def predict_nnunet(setup: Setup, plans: str, fold: int, inputs: Path, out: Path, tta: bool, log: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [setup.nnunet("nnUNetv2_predict"), "-i", str(inputs), "-o", str(out), "-d", str(setup.dataset_id), "-c",
           "2d", "-p", plans, "-tr", TRAINER, "-f", str(fold), "-device", setup.device]
    if not tta:
        cmd.append("--disable_tta")
    if setup.device == "cpu":
        cmd += ["-npp", "1", "-nps", "1"]
    return run(cmd, setup, log)


# ---------------------------------------------------------------------------- mslpipe
def _log_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def train_mslpipe(setup: Setup, arm: str, fold: int, logs: Path) -> dict:
    """``mslpipe train --minutes``: whole epochs while the next one fits into the budget, nnU-Net's rule in
    ``bench/nnunet/trainers`` (the poly schedule spans the epochs expected to fit). With ``setup.iterations``: one
    epoch of that many iterations."""
    name, dev = setup.mslpipe_name(arm), setup.device
    length = (["--epochs", "1", "--iterations", str(setup.iterations)] if setup.iterations
              else ["--minutes", f"{setup.budget_min:g}"])
    fold_dir = setup.work / "mslpipe" / "results" / name / "leaky_unet" / f"fold_{fold}"
    shutil.rmtree(fold_dir, ignore_errors=True)
    wall = run(mslpipe(*setup.mslpipe_globals(), "train", "-d", name, "--fold", str(fold), *length,
                       "--device", dev, *(["--compile"] if setup.compile else [])), setup, logs / "train.log")
    rows = _log_rows(fold_dir / "log.csv")
    secs = [float(r["seconds"]) for r in rows]
    dice = [float(r["val_dice"]) for r in rows]
    best = max(range(len(dice)), key=lambda i: dice[i]) if dice else None
    # the BatchNorm pass after the loop, on the budget's time (absent before 6c35223 and with it off)
    bn_pass = json.loads((fold_dir / "run.json").read_text()).get("bn_recalibration", {})
    return {"wall_s": wall, "epochs": len(rows), "s_per_epoch": sorted(secs)[len(secs) // 2] if secs else None,
            "loop_s": sum(secs), "bn_recalibration_s": bn_pass.get("seconds"),
            "time_to_best_s": sum(secs[: best + 1]) if best is not None else None,
            "best_epoch": best, "selection": "whole-volume validation Dice (mslpipe)",
            "stopping": "--minutes: whole epochs while the next fits" if not setup.iterations else "one epoch"}


def predict_mslpipe(setup: Setup, arm: str, fold: int, inputs: Path, out: Path, tta: bool, log: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = mslpipe(*setup.mslpipe_globals(), "predict", "-d", setup.mslpipe_name(arm), "-i", str(inputs), "-o", str(out),
                  "--folds", str(fold), "--device", setup.device)
    if tta:
        cmd.append("--tta")
    return run(cmd, setup, log)


def describe_network(setup: Setup, arm: str) -> str:
    """The arm's network in a few words, from its plans (for the tables)."""
    system, plans = ARMS[arm]
    if system == "nnunet":
        cfg = json.loads((setup.work / "nnUNet_preprocessed" / setup.nnunet_dataset / f"{plans}.json").read_text())
        cfg = cfg["configurations"]["2d"]
        arch = cfg["architecture"]
        feats = arch["arch_kwargs"].get("features_per_stage") or []
        width = f" {feats[0]}→{feats[-1]} features," if feats else ""
        name = arch["network_class_name"].rsplit(".", 1)[-1]
        return f"{name}{width} patch {'×'.join(map(str, cfg['patch_size']))}, batch {cfg['batch_size']}"
    from mslpipe import architectures

    plan = json.loads((setup.work / "mslpipe" / "plans" / setup.mslpipe_name(arm) / "plans.json").read_text())
    in_channels = len(plan["channels"]) * (2 * plan.get("context_slices", 0) + 1)
    model = architectures.build(plan["architecture"], in_channels=in_channels, **plan["arch_kwargs"])
    params = sum(p.numel() for p in model.parameters()) / 1e6
    kwargs = ", ".join(f"{k} {v}" for k, v in plan["arch_kwargs"].items()) or "full width"
    return (f"{plan['architecture']} ({kwargs}; {params:.2f} M), patch {'×'.join(map(str, plan['patch_size']))}, "
            f"batch {plan['batch_size']}")


# ---------------------------------------------------------------------------- one arm, one fold
def link_inputs(setup: Setup, arm: str, folder: Path, cases: list[str]) -> Path:
    """The scans as the arm's predict command wants them named (nnU-Net: with its channel suffix)."""
    suffix = "_0000.nii.gz" if ARMS[arm][0] == "nnunet" else ".nii.gz"
    return link_folder(folder, {f"{c}{suffix}": setup.images[c] for c in cases})


def predict_arm(setup: Setup, arm: str, fold: int, inputs: Path, out: Path, tta: bool, log: Path) -> float:
    """The arm's predict command on ``inputs`` (see :func:`link_inputs`); its wall seconds."""
    system, plans = ARMS[arm]
    if system == "nnunet":
        return predict_nnunet(setup, plans, fold, inputs, out, tta, log)
    return predict_mslpipe(setup, arm, fold, inputs, out, tta, log)


def run_arm(setup: Setup, arm: str, fold: int) -> dict:
    system, plans = ARMS[arm]
    val = setup.folds[fold]["val"]
    base = setup.work / "runs" / arm / f"fold_{fold}"
    logs = base / "logs"
    shutil.rmtree(logs, ignore_errors=True)
    refs = refs_folder(setup, val, base / "refs")
    entry: dict = {"arm": arm, "fold": fold, "val": val, "train": setup.folds[fold]["train"],
                   "budget_min": setup.budget_min, "device": setup.device, "iterations": setup.iterations,
                   "network": describe_network(setup, arm)}
    if system == "nnunet":
        entry["training"] = train_nnunet(setup, plans, fold, logs)
        if not setup.speed_only:
            # nnU-Net's own validation predictions, scored by mslpipe too: a cross-check of the metric code
            entry["nnunet_validation_scored_by_mslpipe"] = score(
                setup, Path(entry["training"]["validation_dir"]), refs, base / "scores" / "nnunet_validation.json")
    else:
        entry["training"] = train_mslpipe(setup, arm, fold, logs)
    inputs = link_inputs(setup, arm, base / "inputs", val)
    entry["inference"] = {}
    for tta in (True, False):
        key = "tta" if tta else "no_tta"
        out, log = base / f"pred_{key}", logs / f"predict_{'tta' if tta else 'notta'}.log"
        wall = predict_arm(setup, arm, fold, inputs, out, tta, log)
        scores = score(setup, out, refs, base / "scores" / f"{key}.json")
        entry["inference"][key] = {"wall_s": wall, "n_volumes": len(val), "s_per_volume": wall / len(val),
                                   "pred_dir": str(out), "scores": scores}
        if system == "mslpipe":  # where mslpipe's time went (its own `time:` line), for the speed work
            entry["inference"][key]["mslpipe_timing"] = _timing_line(log)
    if setup.throughput:
        entry["throughput"] = throughput(setup, arm, fold, base, logs)
    return entry


def _timing_line(log: Path) -> str | None:
    """mslpipe's own ``time:`` line from a predict log: where its time went."""
    lines = [ln for ln in log.read_text().splitlines() if ln.startswith("time: ")]
    return lines[-1] if lines else None


def throughput(setup: Setup, arm: str, fold: int, base: Path, logs: Path) -> dict:
    """Each system's default inference (nnU-Net with mirroring, mslpipe without) over every scan of the dataset in
    one command, timed end to end: start-up spread over more volumes than a fold's validation scans. Speed only:
    the fold's training scans are among them, so these predictions are not scored."""
    system = ARMS[arm][0]
    tta = system == "nnunet"  # each system's default
    cases = sorted(setup.images)
    out, log = base / "pred_all", logs / "predict_all.log"
    wall = predict_arm(setup, arm, fold, link_inputs(setup, arm, base / "inputs_all", cases), out, tta, log)
    result = {"n_volumes": len(cases), "wall_s": wall, "s_per_volume": wall / len(cases),
              "inference": "tta" if tta else "no_tta"}
    if system == "mslpipe":
        result["mslpipe_timing"] = _timing_line(log)
    shutil.rmtree(out, ignore_errors=True)
    return result
