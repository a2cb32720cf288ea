"""`mslpipe train`: one fold of the plan's network, with checkpoints, resume, logs and curves.

Everything the run needs comes from the plan (plus command-line overrides, recorded in the
fold folder). Validation scores whole volumes through :mod:`mslpipe.inference`, the same code
`predict` uses. Under ``torchrun`` the same function trains with DistributedDataParallel.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mslpipe import architectures, checkpoints, data_loading, inference, metrics
from mslpipe.budget import EpochBudget
from mslpipe.errors import MslpipeError
from mslpipe.io import read_json, save_nifti, write_json
from mslpipe.plans import Plan, Workdirs, apply_overrides, load_plan
from mslpipe.preprocess import restore
from mslpipe.train_parts import (
    RECALIBRATION_STEP_SHARE,
    batch_to_device,
    close_dist,
    from_rank0,
    init_dist,
    init_output_prior,
    make_ema,
    make_loss,
    make_optimizer,
    make_step,
    next_batches,
    plot_curve,
    poly_lr,
    read_log,
    recalibrate_batchnorm,
    wrap_ddp,
    write_log,
)

log = logging.getLogger(__name__)


@dataclass
class FoldData:
    """The case ids a fold trains on and validates on."""

    train: list[str]
    val: list[str]


def fold_cases(splits: dict, fingerprint: dict, fold: int | str) -> FoldData:
    """The cases of fold ``fold`` (0..K-1), or for "final" the 8:1:1 view's train and validation cases (all trained)."""
    from mslpipe.plan import cases_of

    if fold == "final":
        view = splits["split_811"]
        return FoldData(cases_of(view["train"] + view["val"], fingerprint), [])
    k = int(fold)
    if not 0 <= k < len(splits["folds"]):
        raise MslpipeError(f"fold {k} does not exist: the splits have folds 0..{len(splits['folds']) - 1}")
    f = splits["folds"][k]
    return FoldData(cases_of(f["train"], fingerprint), cases_of(f["val"], fingerprint))


# ---------------------------------------------------------------------------- validation
def validate(model, cases: list[str], pre_dir: Path, plan: Plan, device: str, divisor: int,
             loss_fn) -> tuple[float, dict[str, float]]:
    """Mean loss and Dice per case of ``model`` on whole validation volumes, through :mod:`mslpipe.inference`."""
    import torch

    losses, dices = [], {}
    model.eval()
    for case in cases:
        image, seg, _ = data_loading.load_case_arrays(pre_dir, case)
        logits = inference.predict_volume([model], image, divisor=divisor, device=device,
                                          batch_size=plan.inference_batch_size, return_logits=True,
                                          context=plan.context_slices)
        with torch.no_grad():
            losses.append(float(loss_fn(torch.from_numpy(logits)[:, None], torch.from_numpy(seg)[:, None])))
        pred = logits > 0
        dices[case] = float(metrics.dice(pred, seg >= 0.5))
    return (float(np.mean(losses)) if losses else float("nan")), dices


def export_validation(model, cases: list[str], pre_dir: Path, plan: Plan, device: str, divisor: int,
                      out_dir: Path) -> None:
    """Out-of-fold predictions on the scans' own grids (no postprocessing), for `evaluate`."""
    for case in cases:
        image, _, props = data_loading.load_case_arrays(pre_dir, case)
        prob = inference.predict_volume([model], image, divisor=divisor, device=device,
                                        batch_size=plan.inference_batch_size, context=plan.context_slices)
        mask = restore((prob >= plan.postprocessing.get("threshold", 0.5)).astype(np.uint8), props)
        save_nifti(out_dir / f"{case}.nii.gz", mask, np.asarray(props["affine"]))


# ---------------------------------------------------------------------------- the run
def run(name: str, dirs: Workdirs, fold: int | str, *, arch: str | None = None, epochs: int | None = None,
        lr: float | None = None, batch_size: int | None = None, iterations: int | None = None,
        device: str = "auto", compile: bool = False, resume: bool = False, num_workers: int | None = None,
        ema_half_life: float | None = None, minutes: float | None = None, show_progress: bool = True
        ) -> dict[str, Any]:
    """Train one fold of the plan's network, with the given overrides, into its results folder.
    ``minutes``: whole epochs while the next one fits into this wall-clock budget (:mod:`mslpipe.budget`),
    with ``epochs`` as a cap (1000 unless given)."""
    import torch

    plan_dir = dirs.plan_dir(name)
    base = load_plan(plan_dir / "plans.json")
    splits, fingerprint = read_json(plan_dir / "splits.json"), read_json(plan_dir / "fingerprint.json")
    device = inference.pick_device(device)
    budget = _epoch_budget(minutes, epochs)
    plan, divisor = _effective_plan(base, budget, arch=arch, epochs=epochs, lr=lr, batch_size=batch_size,
                                    iterations=iterations, num_workers=num_workers, ema_half_life=ema_half_life)
    if budget is not None:  # the BatchNorm pass after the last epoch runs on the budget's time
        budget.after = RECALIBRATION_STEP_SHARE * plan.bn_recalibration_batches / plan.iterations_per_epoch
    data = fold_cases(splits, fingerprint, fold)
    pre_dir = dirs.preprocessed_dir(name)
    out = dirs.fold_dir(name, plan.architecture, fold)
    rank, world = init_dist(device)
    r = _Run(name, fold, plan, budget, divisor, data, pre_dir, out, device, rank, world)
    if rank == 0:
        _start_fold_dir(r, resume=resume, compile=compile, minutes=minutes)

    _build_network(r)
    loss_fn = make_loss(r.plan)
    start_epoch, best, rows = _restore(r) if resume else (0, -1.0, [])
    train_model = wrap_ddp(r.model, device, world)
    step = make_step(r.model, torch.compile(train_model) if compile else train_model, r.opt, loss_fn, device, r.ema)
    # One loader for the whole run: its workers stay alive across epochs, and each epoch's batches
    # follow from (seed, epoch), so a resumed run draws exactly what the uninterrupted one would.
    loader = data_loading.make_train_loader(pre_dir, data.train, plan, batches=plan.iterations_per_epoch,
                                            seed=plan.seed + rank, device_hint=device, start_epoch=start_epoch)
    epoch = _train_epochs(r, train_model, step, loader, loss_fn, start_epoch, best, rows, show_progress)
    final_dice = _save_final(r, epoch, loss_fn, loader) if rank == 0 else None
    close_dist(world)
    final = rows[-1] if rows else {}
    return {"fold_dir": out, "epochs": epoch, "val_dice": final.get("val_dice"), "rows": rows, "rank": rank,
            "val_dice_recalibrated": final_dice}


@dataclass
class _Run:
    """One fold's run: its effective plan and budget, cases, folders, device and rank among ``world`` processes;
    then (see _build_network) its network, optimiser, weights' moving average (or None) and memory layout."""

    name: str
    fold: int | str
    plan: Plan
    budget: EpochBudget | None
    divisor: int
    data: FoldData
    pre_dir: Path
    out: Path
    device: str
    rank: int
    world: int
    model: Any = None
    opt: Any = None
    ema: Any = None
    layout: Any = None

    @property
    def scored(self):
        """What validation scores and the best and final checkpoints hold: the moving average, else the model."""
        return self.ema.module if self.ema is not None else self.model

    def checkpoint(self, which: str) -> Path:
        """The path of checkpoint_{latest,previous,best,final}.pt."""
        return self.out / f"checkpoint_{which}.pt"

    def meta(self, **more) -> dict[str, Any]:
        """A checkpoint's ``meta``: plan, fold and dataset, then ``more``."""
        return {"plan": self.plan.to_dict(), "fold": str(self.fold), "dataset": self.name, **more}


def _epoch_budget(minutes: float | None, epochs: int | None) -> EpochBudget | None:
    """The wall-clock budget of ``--minutes``, ``--epochs`` (or 1000) its cap; None without ``--minutes``."""
    if minutes is not None and not minutes > 0:
        raise MslpipeError(f"--minutes must be positive, not {minutes:g}")
    if minutes is not None and epochs is not None and epochs < 1:
        raise MslpipeError(f"--epochs (with --minutes, the most epochs to run) must be at least 1, not {epochs}")
    return EpochBudget(minutes * 60, cap=epochs or 1000) if minutes is not None else None


def _effective_plan(base: Plan, budget: EpochBudget | None, *, arch, epochs, lr, batch_size, iterations,
                    num_workers, ema_half_life) -> tuple[Plan, int]:
    """(the plan with the command line's overrides, the patch rounded up to the network's divisor; the divisor)."""
    optimizer = dict(base.optimizer, lr=lr) if lr is not None else None
    arch_kwargs = None  # another architecture than the plan's: sized for the plan's device, fitted to its patch
    if arch is not None and arch != base.architecture:
        arch_kwargs = architectures.cpu_kwargs(arch) if base.target_device == "cpu" else {}
    plan = apply_overrides(base, {"architecture": arch, "arch_kwargs": arch_kwargs,
                                  "epochs": None if budget else epochs,
                                  "batch_size": batch_size, "iterations_per_epoch": iterations,
                                  "optimizer": optimizer, "num_workers": num_workers,
                                  "ema_half_life": ema_half_life})
    if budget is not None and plan.ema_half_life:
        raise MslpipeError("--minutes leaves the run's length open, and the weights' moving average needs it (its "
                           "half-life is a fraction of the run): train --epochs N with --ema-half-life, or "
                           "--minutes with --ema-half-life 0")
    if arch_kwargs is not None:
        plan = apply_overrides(plan, {"arch_kwargs": architectures.fit_to_patch(plan.architecture, plan.patch_size,
                                                                                **arch_kwargs)})
    divisor = architectures.required_divisor(plan.architecture, **plan.arch_kwargs)
    if any(p % divisor for p in plan.patch_size):  # another architecture may need a coarser grid
        plan = apply_overrides(plan, {"patch_size": [-(-p // divisor) * divisor for p in plan.patch_size]})
    return plan, divisor


def _start_fold_dir(r: _Run, *, resume: bool, compile: bool, minutes: float | None) -> None:
    """Refuse to overwrite a run unless resuming; record the effective plan and the run's settings."""
    if not resume and r.checkpoint("latest").exists():
        raise MslpipeError("a run exists here already: add --continue to resume it, or delete the folder", r.out)
    if resume and (r.out / "plan.json").exists() and any(r.checkpoint(k).exists() for k in ("latest", "previous")):
        _check_same_plan(read_json(r.out / "plan.json"), json.loads(json.dumps(r.plan.to_dict())),
                         r.out / "plan.json")  # both as JSON reads them (lists, not tuples)
    write_json(r.out / "plan.json", r.plan.to_dict())
    write_json(r.out / "run.json", {"fold": r.fold, "train": r.data.train, "val": r.data.val, "device": r.device,
                                    "world_size": r.world, "compile": compile, "minutes": minutes,
                                    "epoch_cap": r.budget.cap if r.budget else None})


# what a resumed run may change: its length, its loader's workers, and what happens after the last epoch
RESUMABLE_CHANGES = frozenset({"epochs", "iterations_per_epoch", "num_workers", "ema_half_life",
                               "bn_recalibration_batches", "inference_batch_size", "postprocessing", "target_device",
                               "mslpipe_version", "version", "hash"})


def _check_same_plan(before: dict, now: dict, where: Path) -> None:
    """Refuse to resume a run whose data, network or optimisation the plan now describes differently (the dataset
    planned again with other settings, or another --arch, --lr or --batch-size): its checkpoint would not fit, or
    would go on learning from differently prepared slices. Nothing in the run's folder is changed."""
    changed = sorted(k for k in set(before) | set(now) if k not in RESUMABLE_CHANGES and before.get(k) != now.get(k))
    if changed:
        raise MslpipeError(f"--continue: this run was trained with another plan ({', '.join(changed)} differ from "
                           "the plan and options now); resume it with the plan and options it started with, or "
                           "delete the folder to train it again", where)


def _build_network(r: _Run) -> None:
    """Seed torch and numpy for this rank, then build the network (output bias at the plan's prior), its
    optimiser and moving average, in this order: the seeded random draws depend on it."""
    import torch

    torch.manual_seed(r.plan.seed + r.rank)
    np.random.seed(r.plan.seed + r.rank)
    if r.device == "cuda":
        torch.backends.cudnn.benchmark = True
    model = architectures.build(r.plan.architecture, in_channels=r.plan.input_channels, **r.plan.arch_kwargs)
    init_output_prior(model, r.plan.output_prior)
    r.model = inference.prepare_model(model, r.device)
    r.layout = architectures.memory_format(r.model, r.device)
    r.opt = make_optimizer(r.model, r.plan)
    r.ema = make_ema(r.model, r.plan)


def _restore(r: _Run) -> tuple[int, float, list[dict]]:
    """Load the last readable checkpoint (weights, optimiser, moving average, budget spent, RNG state); returns
    (first epoch to run, best Dice, the log rows before it), or (0, -1.0, []) when there is none."""
    payload = _load_resume(r.checkpoint("latest"), r.checkpoint("previous"))
    if payload is None:
        return 0, -1.0, []
    r.model.load_state_dict(payload["model"])
    r.opt.load_state_dict(payload["optimizer"])
    if r.ema is not None:
        if "ema" not in payload:
            raise MslpipeError("this run's checkpoint has no weight average (ema_half_life was 0): "
                               "resume it with --ema-half-life 0", r.checkpoint("latest"))
        r.ema.load_state_dict(payload["ema"])
    meta = payload["meta"]
    start_epoch, best = meta["epoch"] + 1, meta["best_dice"]
    if r.budget is not None and meta.get("budget"):  # the minutes already spent count
        r.budget.spent = float(meta["budget"]["spent"])
        r.budget.epoch_s = [float(x) for x in meta["budget"]["epoch_s"]]
    checkpoints.set_rng_state(payload["rng"])
    rows = [row for row in read_log(r.out / "log.csv") if int(row["epoch"]) < start_epoch]
    log.info("resuming %s at epoch %d", r.out, start_epoch)
    return start_epoch, best, rows


def _train_epochs(r: _Run, train_model, step, loader, loss_fn, start_epoch: int, best: float, rows: list[dict],
                  show_progress: bool) -> int:
    """Epochs from ``start_epoch`` to the plan's or the budget's end: each trained, then on rank 0 validated,
    logged (appended to ``rows``) and checkpointed. Returns the epoch count reached."""
    progress = _progress(show_progress and r.rank == 0)
    total = r.budget.total(start_epoch) if r.budget else r.plan.epochs  # the run's epochs: fixed, or what fits
    per_epoch = r.plan.iterations_per_epoch
    epoch, mark = start_epoch, time.perf_counter()
    with progress:
        task = progress.add_task(f"fold {r.fold}", total=None if r.budget else (total - start_epoch) * per_epoch)
        while epoch < total:
            t0 = time.perf_counter()
            lr_now = poly_lr(r.plan, epoch, total)
            train_loss = _train_epoch(r, train_model, step, loader, lr_now, lambda: progress.advance(task))
            if r.rank == 0:
                val_dice, dices = _validate_and_log(r, loss_fn, rows, epoch, train_loss, lr_now, t0)
            if r.budget is not None:  # an epoch runs from the last one's end; rank 0's clock decides for all ranks
                now = time.perf_counter()
                r.budget.add(from_rank0(now - mark, r.device, r.world))
                mark, total = now, r.budget.total(epoch + 1)
            if r.rank == 0:
                # under a budget the bar's length is the epochs expected to fit, re-estimated after each one
                val_text = f"val Dice {val_dice:.3f}" if dices else "no validation scans"
                progress.update(task, description=f"fold {r.fold} ep {epoch + 1}/{total} "
                                                  f"loss {train_loss:.3f} {val_text}",
                                total=(total - start_epoch) * per_epoch)
                improved = bool(dices) and val_dice > best
                best = max(best, val_dice) if dices else best
                _save_epoch(r, epoch, best, improved)
            epoch += 1
    return epoch


def _train_epoch(r: _Run, train_model, step, loader, lr: float, advance) -> float:
    """One pass over the loader at learning rate ``lr``, calling ``advance`` after each step; the mean loss."""
    import torch

    for g in r.opt.param_groups:
        g["lr"] = lr
    train_model.train()
    losses = []
    for batch in loader:
        losses.append(step(*batch_to_device(batch, r.device, r.layout)))
        advance()
    return float(torch.stack(losses).mean())


def _validate_and_log(r: _Run, loss_fn, rows: list[dict], epoch: int, train_loss: float, lr: float,
                      t0: float) -> tuple[float, dict[str, float]]:
    """Validate, append the epoch's row to ``rows``, rewrite log.csv and curve.png; (mean Dice, Dice per case)."""
    val_loss, dices = validate(r.scored, r.data.val, r.pre_dir, r.plan, r.device, r.divisor, loss_fn)
    val_dice = float(np.mean(list(dices.values()))) if dices else float("nan")
    rows.append({"epoch": epoch, "train_loss": f"{train_loss:.5f}", "val_loss": f"{val_loss:.5f}",
                 "val_dice": f"{val_dice:.5f}", "val_dice_per_case": " ".join(f"{c}={d:.4f}" for c, d in dices.items()),
                 "lr": f"{lr:.6g}", "seconds": f"{time.perf_counter() - t0:.2f}"})
    write_log(r.out / "log.csv", rows)
    plot_curve(rows, r.out / "curve.png")
    return val_dice, dices


def _save_epoch(r: _Run, epoch: int, best: float, improved: bool) -> None:
    """Save the whole state as checkpoint_latest.pt (the one before becomes checkpoint_previous.pt), and the
    scored weights as checkpoint_best.pt when validation improved."""
    state = {"model": r.model.state_dict(), "optimizer": r.opt.state_dict(), "rng": checkpoints.rng_state(),
             "meta": r.meta(epoch=epoch, best_dice=best, **({"budget": r.budget.state()} if r.budget else {}))}
    if r.ema is not None:
        state["ema"] = r.ema.state_dict()
    if improved:
        checkpoints.save(r.checkpoint("best"), dict(state, model=r.scored.state_dict()))
    if r.checkpoint("latest").exists():
        os.replace(r.checkpoint("latest"), r.checkpoint("previous"))
    checkpoints.save(r.checkpoint("latest"), state)


def _save_final(r: _Run, epochs: int, loss_fn, loader) -> float | None:
    """Save the scored weights as checkpoint_final.pt, and their out-of-fold predictions when the fold has any.
    With the plan's ``bn_recalibration_batches``, their BatchNorm statistics are first estimated again on that
    many batches of the training ``loader``'s next epochs (:func:`recalibrate_batchnorm`), and the validation Dice
    of the weights so saved is returned (None without recalibration or validation cases)."""
    final_dice = None
    if r.plan.bn_recalibration_batches:
        t0 = time.perf_counter()
        used = recalibrate_batchnorm(r.scored, next_batches(loader, r.plan.bn_recalibration_batches), r.device,
                                     r.layout)
        record = {"batches": used, "seconds": round(time.perf_counter() - t0, 3)}
        if used and r.data.val:
            _, dices = validate(r.scored, r.data.val, r.pre_dir, r.plan, r.device, r.divisor, loss_fn)
            final_dice = float(np.mean(list(dices.values())))
            record.update(val_dice=final_dice, val_dice_per_case=dices)
            log.info("BatchNorm statistics estimated again on %d training batches: validation Dice %.4f (%s)",
                     used, final_dice, " ".join(f"{c}={d:.4f}" for c, d in dices.items()))
        # beside the run's settings: what the pass took (outside log.csv's epochs) and the Dice it left
        write_json(r.out / "run.json", {**read_json(r.out / "run.json"), "bn_recalibration": record})
    r.scored.eval()
    checkpoints.save(r.checkpoint("final"), {"model": r.scored.state_dict(), "meta": r.meta(epoch=epochs - 1)})
    if r.data.val:
        export_validation(r.scored, r.data.val, r.pre_dir, r.plan, r.device, r.divisor, r.out / "validation")
    return final_dice


def _load_resume(latest: Path, previous: Path) -> dict | None:
    """The latest checkpoint, else the previous one if the latest is unreadable; None when there is neither."""
    for path in (latest, previous):
        if not path.exists():
            continue
        try:
            return checkpoints.load(path)
        except MslpipeError as exc:
            log.warning("%s; falling back to the previous checkpoint", exc)
    if latest.exists() or previous.exists():
        raise MslpipeError("no readable checkpoint to resume from", latest.parent)
    log.warning("nothing to resume in %s: starting from epoch 0", latest.parent)
    return None


def _progress(enabled: bool):
    """The run's progress bar (rich), drawn only when ``enabled``."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                    TimeElapsedColumn(), TimeRemainingColumn(), disable=not enabled, transient=False)
