"""Training: outputs of a fold, safe checkpoints, exact resume after SIGKILL, DDP, learning."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mslpipe import train
from mslpipe.errors import MslpipeError
from mslpipe.io import load_image
from mslpipe.plans import Workdirs, load_plan

TEXT = {"text": True, "encoding": "utf-8", "errors": "replace"}  # the CLI prints UTF-8 whatever the locale


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _copy_planned(planned, tmp_path: Path) -> Workdirs:
    d, _ = planned
    new = Workdirs.resolve(tmp_path / "raw", tmp_path / "plans", tmp_path / "pre", tmp_path / "results")
    shutil.copytree(d.plans, new.plans)
    shutil.copytree(d.preprocessed, new.preprocessed)
    return new


def _cli(d: Workdirs, *args: str) -> list[str]:
    return [sys.executable, "-m", "mslpipe", "--plans", str(d.plans), "--preprocessed", str(d.preprocessed),
            "--results", str(d.results), *args]


def test_fold_outputs(trained, planned):
    d, result = trained
    fold = result["fold_dir"]
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt", "log.csv", "curve.png",
                 "plan.json", "run.json"):
        assert (fold / name).is_file(), name
    rows = _rows(fold / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    for r in rows:
        assert float(r["train_loss"]) > 0 and float(r["val_loss"]) > 0
        assert 0 <= float(r["val_dice"]) <= 1 and r["val_dice_per_case"]
    assert (fold / "curve.png").read_bytes()[:4] == b"\x89PNG"
    # out-of-fold predictions sit on each scan's own grid
    splits = planned[1]["splits"]
    val_subjects = set(splits["folds"][0]["val"])
    preds = sorted((fold / "validation").glob("*.nii.gz"))
    assert preds and all(p.name.split("_")[0] in val_subjects for p in preds)
    fp = {c["case"]: c for c in planned[1]["fingerprint"]["cases"]}
    data, _ = load_image(preds[0])
    assert list(data.shape) == fp[preds[0].name[:-7]]["shape"]
    assert set(np.unique(data)) <= {0.0, 1.0}


def test_checkpoints_load_weights_only(trained):
    _, result = trained
    for name in ("checkpoint_latest.pt", "checkpoint_best.pt", "checkpoint_final.pt"):
        payload = torch.load(result["fold_dir"] / name, weights_only=True)
        assert "model" in payload and payload["meta"]["plan"]["architecture"] == "leaky_unet"
    latest = torch.load(result["fold_dir"] / "checkpoint_latest.pt", weights_only=True)
    assert {"optimizer", "rng"} <= set(latest) and latest["meta"]["epoch"] == 1


def test_existing_run_needs_continue(trained):
    d, _ = trained
    with pytest.raises(MslpipeError, match="--continue"):
        train.run("syn", d, 0, epochs=2, iterations=3, device="cpu", show_progress=False)


def test_unknown_fold_is_refused(planned):
    d, _ = planned
    with pytest.raises(MslpipeError, match="fold 9 does not exist"):
        train.run("syn", d, 9, epochs=1, iterations=1, device="cpu", show_progress=False)


def test_kill_then_continue_resumes_exactly(planned, tmp_path):
    """SIGKILL mid-run, then --continue: same epochs, same losses as an uninterrupted run."""
    args = ["train", "-d", "syn", "--fold", "1", "--epochs", "4", "--iterations", "4", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = _copy_planned(planned, tmp_path / "ref")
    subprocess.run(_cli(ref, *args), check=True, env=env, capture_output=True)
    ref_rows = _rows(ref.fold_dir("syn", "leaky_unet", 1) / "log.csv")

    d = _copy_planned(planned, tmp_path / "killed")
    fold = d.fold_dir("syn", "leaky_unet", 1)
    proc = subprocess.Popen(_cli(d, *args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (fold / "checkpoint_latest.pt").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    time.sleep(0.3)  # into the next epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(_rows(fold / "log.csv"))
    assert done_before < 4, "the run finished before it could be killed"
    assert not (fold / "checkpoint_final.pt").exists()
    out = subprocess.run(_cli(d, *args, "--continue"), env=env, capture_output=True, **TEXT)
    assert out.returncode == 0, out.stderr
    rows = _rows(fold / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in rows] == [r["train_loss"] for r in ref_rows]
    assert [r["val_dice"] for r in rows] == [r["val_dice"] for r in ref_rows]
    assert (fold / "checkpoint_final.pt").exists()


def test_corrupt_latest_falls_back_to_previous(trained, tmp_path, planned, caplog):
    d = _copy_planned(planned, tmp_path)
    shutil.copytree(trained[1]["fold_dir"], d.fold_dir("syn", "leaky_unet", 0))
    fold = d.fold_dir("syn", "leaky_unet", 0)
    (fold / "checkpoint_latest.pt").write_bytes(b"PK\x03\x04 truncated")
    result = train.run("syn", d, 0, epochs=3, iterations=2, device="cpu", resume=True, show_progress=False)
    assert "falling back" in caplog.text
    assert [int(r["epoch"]) for r in result["rows"]] == [0, 1, 2]


@pytest.mark.slow
def test_learns_easy_synthetic_data(tmp_path):
    """A CPU plan on easy synthetic data reaches volume-level validation Dice > 0.5."""
    from mslpipe import plan
    from mslpipe.synth import make_dataset

    d = Workdirs.resolve(tmp_path / "raw", tmp_path / "plans", tmp_path / "pre", tmp_path / "results")
    make_dataset(d.raw / "easy", subjects=5, timepoints=2, shape=(48, 56, 40), seed=11)
    plan.run("easy", d, device="cpu", test_fraction=0,
             overrides={"arch_kwargs": {"base_channels": 8, "max_channels": 64, "depth": 3},
                        "batch_size": 12, "num_workers": 0})
    result = train.run("easy", d, 0, epochs=8, iterations=15, device="cpu", show_progress=False)
    assert float(result["val_dice"]) > 0.5, result["rows"]


def test_ddp_two_cpu_processes(planned, tmp_path):
    """torchrun with 2 processes and the gloo backend trains and writes one set of outputs; rank 0 alone estimates
    the final weights' BatchNorm statistics again (no collective call, so the other rank's exit cannot hang it)."""
    d = _copy_planned(planned, tmp_path)
    plan_path = d.plan_dir("syn") / "plans.json"
    plan_path.write_text(json.dumps({**json.loads(plan_path.read_text()), "bn_recalibration_batches": 3, "hash": ""}))
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(29500 + os.getpid() % 1000),
           "-m", "mslpipe", *_cli(d, "train", "-d", "syn", "--fold", "2", "--epochs", "1", "--iterations", "2",
                                  "--device", "cpu")[3:]]
    out = subprocess.run(cmd, capture_output=True, **TEXT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fold = d.fold_dir("syn", "leaky_unet", 2)
    assert (fold / "checkpoint_final.pt").exists()
    assert len(_rows(fold / "log.csv")) == 1
    run = (fold / "run.json").read_text()
    assert '"world_size": 2' in run
    assert json.loads(run)["bn_recalibration"]["batches"] == 3
    final = torch.load(fold / "checkpoint_final.pt", weights_only=True)["model"]
    tracked = [k for k in final if k.endswith("num_batches_tracked")]
    assert tracked and all(int(final[k]) == 3 for k in tracked) and not any(k.startswith("module.") for k in final)


def test_ema_decay_follows_the_half_life():
    """make_ema: decay per step such that the weights' moving average halves a step's weight after
    ema_half_life × epochs × iterations steps; off at 0."""
    from mslpipe.plans import Plan

    plan = Plan(dataset="x", epochs=4, iterations_per_epoch=5, ema_half_life=0.1)  # half-life: 2 steps
    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = train.make_ema(model, plan)
    ema.update_parameters(model)  # the first update copies
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(2):
        ema.update_parameters(model)
    assert ema.module.weight.item() == pytest.approx(0.5)
    assert train.make_ema(model, Plan(dataset="x")) is None


def test_ema_run_saves_the_average_and_resumes_exactly(planned, tmp_path):
    """With ema_half_life the final checkpoint holds the moving average (not the last weights), the latest
    checkpoint both; a run resumed from an earlier epoch ends with the same average as an uninterrupted one."""
    kw = {"epochs": 3, "iterations": 3, "device": "cpu", "show_progress": False, "ema_half_life": 0.2}
    ref = _copy_planned(planned, tmp_path / "ref")
    train.run("syn", ref, 1, **kw)
    fold = ref.fold_dir("syn", "leaky_unet", 1)
    final = torch.load(fold / "checkpoint_final.pt", weights_only=True)["model"]
    latest = torch.load(fold / "checkpoint_latest.pt", weights_only=True)
    averaged = {k[len("module."):]: v for k, v in latest["ema"].items() if k.startswith("module.")}
    assert averaged.keys() == final.keys() == latest["model"].keys()
    assert all(torch.equal(averaged[k], final[k]) for k in final)
    weights = [k for k, v in final.items() if v.is_floating_point()]
    assert any(not torch.allclose(final[k], latest["model"][k]) for k in weights)
    assert int(latest["ema"]["n_averaged"]) == 9

    d = _copy_planned(planned, tmp_path / "resumed")
    train.run("syn", d, 1, **kw)
    fold2 = d.fold_dir("syn", "leaky_unet", 1)
    os.replace(fold2 / "checkpoint_previous.pt", fold2 / "checkpoint_latest.pt")  # back to the end of epoch 1
    (fold2 / "checkpoint_final.pt").unlink()
    train.run("syn", d, 1, resume=True, **kw)
    resumed = torch.load(fold2 / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], final[k]) for k in final)


def test_resuming_without_an_average_with_one_is_refused(trained, planned, tmp_path):
    d = _copy_planned(planned, tmp_path)
    shutil.copytree(trained[1]["fold_dir"], d.fold_dir("syn", "leaky_unet", 0))
    with pytest.raises(MslpipeError, match="ema-half-life 0") as info:
        train.run("syn", d, 0, epochs=3, iterations=2, device="cpu", resume=True, show_progress=False,
                  ema_half_life=0.1)
    assert "checkpoint_latest.pt" in str(info.value)


def test_a_time_budget_runs_whole_epochs_and_resumes_with_the_minutes_spent(planned, tmp_path, monkeypatch):
    """--minutes: at least one epoch, however small the budget; --epochs caps it; the minutes spent are kept in
    the checkpoint, so a resumed run stops where the budget ends and goes on when a larger one allows."""
    d = _copy_planned(planned, tmp_path)
    result = train.run("syn", d, 0, iterations=2, device="cpu", minutes=1e-5, show_progress=False)
    fold = d.fold_dir("syn", "leaky_unet", 0)
    assert result["epochs"] == 1 and len(_rows(fold / "log.csv")) == 1
    assert float(_rows(fold / "log.csv")[0]["lr"]) == pytest.approx(train.poly_lr(result_plan(fold), 0, 1000))
    meta = torch.load(fold / "checkpoint_latest.pt", weights_only=True)["meta"]
    assert meta["budget"]["cap"] == 1000 and len(meta["budget"]["epoch_s"]) == 1 and meta["budget"]["spent"] > 0
    run = json.loads((fold / "run.json").read_text())
    assert run["minutes"] == 1e-5 and run["epoch_cap"] == 1000
    # resumed with the same budget: spent, so nothing more; with a larger one, on to the cap
    again = train.run("syn", d, 0, iterations=2, device="cpu", minutes=1e-5, resume=True, show_progress=False)
    assert again["epochs"] == 1 and len(again["rows"]) == 1
    bars, real_progress = [], train._progress
    monkeypatch.setattr(train, "_progress", lambda enabled: bars.append(real_progress(False)) or bars[-1])
    more = train.run("syn", d, 0, iterations=2, device="cpu", minutes=60, epochs=3, resume=True, show_progress=False)
    assert more["epochs"] == 3 and [int(r["epoch"]) for r in more["rows"]] == [0, 1, 2]
    # the progress bar, open-ended at first, ends full: the 2 epochs this run added, of 2 iterations each
    assert [(t.total, t.completed) for t in bars[0].tasks] == [(4, 4)]
    final = torch.load(fold / "checkpoint_final.pt", weights_only=True)["meta"]
    assert final["epoch"] == 2
    # the learning rate decays over the epochs expected to fit: here the cap of 3, reached at the end
    lrs = [float(r["lr"]) for r in more["rows"]]
    assert lrs[1] > lrs[2] and lrs[2] == pytest.approx(train.poly_lr(result_plan(fold), 2, 3))


def test_a_time_budget_and_a_moving_average_are_refused_together(planned, tmp_path):
    d = _copy_planned(planned, tmp_path)
    with pytest.raises(MslpipeError, match="--minutes leaves the run's length open"):
        train.run("syn", d, 0, iterations=2, device="cpu", minutes=1, ema_half_life=0.1, show_progress=False)
    assert not d.fold_dir("syn", "leaky_unet", 0).exists()  # refused before anything is written


def test_a_budget_that_is_not_positive_is_one_clear_line(planned, tmp_path):
    d = _copy_planned(planned, tmp_path)
    for args, message in ((["--minutes", "0"], "error: --minutes must be positive, not 0"),
                          (["--minutes", "5", "--epochs", "0"], "error: --epochs (with --minutes, the most epochs "
                                                                "to run) must be at least 1, not 0")):
        out = subprocess.run(_cli(d, "train", "-d", "syn", "--fold", "0", *args, "--device", "cpu"),
                             capture_output=True, **TEXT)
        assert out.returncode == 1 and out.stderr.strip().splitlines() == [message]
    assert not d.fold_dir("syn", "leaky_unet", 0).exists()


def result_plan(fold: Path):
    from mslpipe.plans import load_plan

    return load_plan(fold / "plan.json")


def test_ddp_with_a_time_budget(planned, tmp_path):
    """Under torchrun every rank stops after the same epoch (rank 0's clock decides), or the run would hang."""
    d = _copy_planned(planned, tmp_path)
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [str(torchrun), "--nproc-per-node", "2", "--master-port", str(30500 + os.getpid() % 1000),
           "-m", "mslpipe", *_cli(d, "train", "-d", "syn", "--fold", "2", "--minutes", "0.00001", "--iterations",
                                  "2", "--device", "cpu")[3:]]
    out = subprocess.run(cmd, capture_output=True, **TEXT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    fold = d.fold_dir("syn", "leaky_unet", 2)
    assert len(_rows(fold / "log.csv")) == 1 and (fold / "checkpoint_final.pt").exists()


def test_the_plans_loss_sets_where_the_dice_is_taken():
    """``bce_dice`` takes one soft Dice over the batch; ``bce_dice_per_slice`` one per slice, then their mean: on a
    batch of a large and a small lesion, missing the small one costs far more per slice."""
    from mslpipe.plans import Plan
    from mslpipe.train_parts import make_loss

    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 2:14, 2:14] = 1  # 144 voxels
    target[1, 0, 7:9, 7:9] = 1  # 4 voxels
    found = target.clone()
    found[1] = 0
    logits = torch.where(found.bool(), 20.0, -20.0)  # finds the large lesion, misses the small one
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    batch = float(make_loss(Plan(dataset="x"))(logits, target) - bce)
    per_slice = float(make_loss(Plan(dataset="x", loss="bce_dice_per_slice"))(logits, target) - bce)
    assert batch == pytest.approx(1 - 2 * 144 / (144 * 2 + 4), abs=1e-3)  # one Dice over all 148 voxels
    assert per_slice == pytest.approx(0.5, abs=1e-3)  # slice 0 perfect, slice 1 missed
    assert float(make_loss()(logits, target) - bce) == pytest.approx(batch)  # no plan: the default


def test_recalibrate_batchnorm_averages_the_final_weights_statistics():
    """recalibrate_batchnorm: each BatchNorm layer's statistics become the plain average over the batches given,
    for the weights as they are (not a running average that remembers older batches); the model's mode is kept;
    a network without BatchNorm is left alone."""
    from mslpipe.train_parts import recalibrate_batchnorm

    torch.manual_seed(0)
    conv = torch.nn.Conv2d(1, 2, 1, bias=False)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(2)).eval()
    model[1].running_mean.fill_(100.0)  # stale statistics
    batches = [{"image": torch.randn(3, 1, 4, 5) + i, "label": torch.zeros(3, 1, 4, 5)} for i in range(4)]
    used = recalibrate_batchnorm(model, batches, "cpu", torch.contiguous_format)
    assert used == 4 and not model.training
    with torch.no_grad():
        outs = [conv(b["image"]) for b in batches]
    expected_mean = torch.stack([o.mean(dim=(0, 2, 3)) for o in outs]).mean(0)
    expected_var = torch.stack([o.transpose(0, 1).reshape(2, -1).var(dim=1) for o in outs]).mean(0)
    assert torch.allclose(model[1].running_mean, expected_mean, atol=1e-5)
    assert torch.allclose(model[1].running_var, expected_var, atol=1e-5)
    assert int(model[1].num_batches_tracked) == 4
    assert model[1].momentum == 0.1  # put back

    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 1, 1))
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    assert recalibrate_batchnorm(plain, batches, "cpu", torch.contiguous_format) == 0
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_a_run_with_bn_recalibration_saves_the_final_weights_new_statistics(planned, tmp_path):
    """With the plan's bn_recalibration_batches the final checkpoint holds the last weights with BatchNorm
    statistics estimated again on that many batches (the latest checkpoint keeps the running averages), its
    out-of-fold predictions come from them, and the run reports their validation Dice; a run resumed from an
    earlier epoch ends with the same statistics; with 0 the running averages stay."""
    def planned_with(folder: Path, batches: int) -> Workdirs:
        d = _copy_planned(planned, folder)
        plan_path = d.plan_dir("syn") / "plans.json"
        plan_path.write_text(json.dumps({**json.loads(plan_path.read_text()), "bn_recalibration_batches": batches,
                                         "hash": ""}))
        return d

    d = planned_with(tmp_path / "on", 3)
    result = train.run("syn", d, 1, epochs=2, iterations=2, device="cpu", show_progress=False)
    fold = d.fold_dir("syn", "leaky_unet", 1)
    final = torch.load(fold / "checkpoint_final.pt", weights_only=True)["model"]
    latest = torch.load(fold / "checkpoint_latest.pt", weights_only=True)["model"]
    tracked = [k for k in final if k.endswith("num_batches_tracked")]
    assert tracked and all(int(final[k]) == 3 for k in tracked)
    assert all(torch.equal(final[k], latest[k]) for k in final if k.endswith(".weight"))
    assert any(not torch.allclose(final[k], latest[k]) for k in final if k.endswith("running_mean"))
    assert 0.0 <= result["val_dice_recalibrated"] <= 1.0
    record = json.loads((fold / "run.json").read_text())["bn_recalibration"]
    assert record["batches"] == 3 and record["seconds"] >= 0 and record["val_dice"] == result["val_dice_recalibrated"]
    assert sorted(p.name for p in (fold / "validation").iterdir())  # exported after the recalibration

    os.replace(fold / "checkpoint_previous.pt", fold / "checkpoint_latest.pt")  # back to the end of epoch 0
    (fold / "checkpoint_final.pt").unlink()
    train.run("syn", d, 1, epochs=2, iterations=2, device="cpu", show_progress=False, resume=True)
    resumed = torch.load(fold / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(torch.equal(resumed[k], final[k]) for k in final)

    off = planned_with(tmp_path / "off", 0)
    assert train.run("syn", off, 1, epochs=2, iterations=2, device="cpu", show_progress=False)[
        "val_dice_recalibrated"] is None
    final = torch.load(off.fold_dir("syn", "leaky_unet", 1) / "checkpoint_final.pt", weights_only=True)["model"]
    assert all(int(final[k]) == 4 for k in tracked)  # the running averages of 2 × 2 training steps


def test_bn_recalibration_batches_must_be_a_whole_number_and_off_keeps_old_hashes():
    from mslpipe.plans import Plan

    with pytest.raises(MslpipeError, match="bn_recalibration_batches"):
        Plan(dataset="x", bn_recalibration_batches=-1).validate()
    with pytest.raises(MslpipeError, match="bn_recalibration_batches"):
        Plan(dataset="x", bn_recalibration_batches=2.5).validate()
    old = Plan(dataset="x").to_dict()
    old.pop("bn_recalibration_batches")  # a plan written before the field
    assert Plan.from_dict(old).compute_hash() == Plan(dataset="x").compute_hash()
    assert Plan(dataset="x", bn_recalibration_batches=50).compute_hash() != Plan(dataset="x").compute_hash()


def test_another_architecture_than_the_plans_gets_options_fitted_to_the_plans_patch(planned, tmp_path):
    """`train --arch nnunet2d` on a plan made for leaky_unet: nnunet2d's depth is fitted to the plan's patch (recorded
    in the fold's plan.json, so predict builds the same network) and the run trains, where the default depth 6 left
    a 1x1 deepest stage that instance norm cannot train on."""
    d = _copy_planned(planned, tmp_path)
    result = train.run("syn", d, 0, arch="nnunet2d", epochs=1, iterations=1, device="cpu", show_progress=False)
    written = load_plan(result["fold_dir"] / "plan.json")
    depth = written.arch_kwargs["depth"]
    assert written.architecture == "nnunet2d" and depth < 6
    assert written.arch_kwargs["base_channels"] == 16  # sized for the plan's CPU, as `plan --arch nnunet2d` would
    assert all(p % 2**depth == 0 and p // 2**depth >= 4 for p in written.patch_size)
    assert (result["fold_dir"] / "checkpoint_final.pt").is_file()


def test_continue_refuses_a_run_of_another_plan_and_changes_nothing(planned, tmp_path):
    """--continue after the dataset was planned again with other settings, or with another --lr: refused naming what
    differs, before the run's folder is touched (its plan.json still describes its checkpoints). A longer run, the
    one change resuming is for, still resumes."""
    from mslpipe.plans import apply_overrides

    d = _copy_planned(planned, tmp_path)
    fold = train.run("syn", d, 0, epochs=1, iterations=1, device="cpu", show_progress=False)["fold_dir"]
    before = {n: (fold / n).read_bytes() for n in ("plan.json", "run.json", "checkpoint_latest.pt", "log.csv")}
    with pytest.raises(MslpipeError, match=r"this run was trained with another plan \(optimizer differ") as info:
        train.run("syn", d, 0, epochs=2, iterations=1, lr=0.5, device="cpu", show_progress=False, resume=True)
    assert info.value.path == str(fold / "plan.json")
    plans_json = d.plan_dir("syn") / "plans.json"
    original = plans_json.read_text()
    replanned = apply_overrides(load_plan(plans_json), {"context_slices": 0, "label_policy": "union"})
    plans_json.write_text(json.dumps(replanned.to_dict()))
    with pytest.raises(MslpipeError, match=r"another plan \(context_slices, label_policy differ"):
        train.run("syn", d, 0, epochs=2, iterations=1, device="cpu", show_progress=False, resume=True)
    assert {n: (fold / n).read_bytes() for n in before} == before
    plans_json.write_text(original)
    train.run("syn", d, 0, epochs=2, iterations=1, device="cpu", show_progress=False, resume=True)
    assert [int(r["epoch"]) for r in _rows(fold / "log.csv")] == [0, 1]


def test_the_final_model_trains_on_train_and_validation_subjects_and_says_it_has_no_validation(planned, tmp_path):
    """`train --fold final`: one model on the 8:1:1 view's train and validation subjects (never the test ones); with
    no validation scans its lines say so instead of "val Dice nan"."""
    d = _copy_planned(planned, tmp_path)
    out = subprocess.run(_cli(d, "train", "-d", "syn", "--fold", "final", "--epochs", "1", "--iterations", "1",
                              "--device", "cpu"), capture_output=True, text=True, env={**os.environ,
                                                                                        "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr
    assert "fold final: 1 epochs, no validation scans (the final model trains on the 8:1:1 view's" in out.stdout
    assert "nan" not in out.stdout
    fold = d.fold_dir("syn", "leaky_unet", "final")
    run = json.loads((fold / "run.json").read_text())
    view = planned[1]["splits"]["split_811"]
    subjects = {case.split("_")[0] for case in run["train"]}
    assert subjects == set(view["train"]) | set(view["val"]) and not subjects & set(view["test"]) and not run["val"]
    assert (fold / "checkpoint_final.pt").is_file()
