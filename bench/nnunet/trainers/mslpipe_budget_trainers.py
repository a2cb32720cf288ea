"""nnU-Net trainers that train for a wall-clock budget instead of 1000 epochs (for bench/real_data.py).

nnU-Net finds them through ``nnUNet_extTrainer`` (set it to this folder)::

    nnUNet_extTrainer=bench/nnunet/trainers MSLPIPE_BUDGET_MINUTES=3 \
        nnUNetv2_train Dataset501_real 2d 0 -tr nnUNetTrainerBudget

``nnUNetTrainerBudget`` is nnU-Net's default ``nnUNetTrainer`` (same loss, augmentation, deep supervision,
250 iterations per epoch, SGD with poly decay) except for when it stops: it runs whole epochs while the
next one is expected to fit into ``MSLPIPE_BUDGET_MINUTES`` (measured from the start of the first epoch,
per-epoch validation included; at least one epoch), and the poly schedule decays over the number of epochs
the budget is expected to hold (re-estimated after every epoch), so the learning rate reaches ~0 at the end
of the budget as it would at epoch 1000. ``nnUNetTrainerBudgetNoDS`` is the same without deep supervision.

Optional: ``MSLPIPE_NNUNET_ITERATIONS`` (training iterations per epoch; validation gets a fifth),
``MSLPIPE_NNUNET_MAX_EPOCHS`` (a hard cap; smoke runs), ``MSLPIPE_NNUNET_SKIP_VALIDATION=1`` (no final
validation of the fold: speed-only runs, where a briefly trained model's scores mean nothing). At the end
``budget_log.json`` in the fold folder records every epoch's seconds and EMA pseudo Dice, the best epoch (the
one ``checkpoint_best.pth`` holds) and the time to it.
"""

from __future__ import annotations

import json
import os
from time import time

import numpy as np
import torch
from batchgenerators.utilities.file_and_folder_operations import join
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainerBudget(nnUNetTrainer):  # noqa: N801 - nnU-Net's naming convention
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.budget_s = float(os.environ.get("MSLPIPE_BUDGET_MINUTES", "3")) * 60.0
        iterations = os.environ.get("MSLPIPE_NNUNET_ITERATIONS")
        if iterations:
            self.num_iterations_per_epoch = max(1, int(iterations))
            self.num_val_iterations_per_epoch = max(1, int(iterations) // 5)
        self.max_epochs = int(os.environ.get("MSLPIPE_NNUNET_MAX_EPOCHS", "1000"))
        self.num_epochs = self.max_epochs

    def _expected_epochs(self, done: int, elapsed: float, epoch_times: list[float]) -> int:
        recent = float(np.mean(epoch_times[-3:]))
        return int(min(self.max_epochs, max(done + 1, done + (self.budget_s - elapsed) // max(recent, 1e-6))))

    def run_training(self):
        self.on_train_start()
        start = time()
        epoch_times: list[float] = []
        while self.current_epoch < self.num_epochs:
            t0 = time()
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()  # increments current_epoch
            epoch_times.append(time() - t0)
            elapsed = time() - start
            expected = self._expected_epochs(self.current_epoch, elapsed, epoch_times)
            if elapsed + float(np.mean(epoch_times[-3:])) > self.budget_s:
                expected = self.current_epoch
            self.num_epochs = expected  # the loop's end, and the poly schedule's length
            self.lr_scheduler.max_steps = max(expected, self.current_epoch + 1)
        self._write_budget_log(start, epoch_times)
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if os.environ.get("MSLPIPE_NNUNET_SKIP_VALIDATION") == "1":
            self.print_to_log_file("final validation skipped (MSLPIPE_NNUNET_SKIP_VALIDATION=1)")
            return
        super().perform_actual_validation(save_probabilities)

    def _write_budget_log(self, start: float, epoch_times: list[float]) -> None:
        if self.local_rank != 0:
            return
        ends = self.logger.get_value("epoch_end_timestamps", step=None)
        ema = [float(v) for v in self.logger.get_value("ema_fg_dice", step=None)]
        best = int(np.argmax(ema)) if ema else None
        record = {
            "trainer": type(self).__name__, "budget_s": self.budget_s, "epochs": len(epoch_times),
            "iterations_per_epoch": self.num_iterations_per_epoch, "epoch_seconds": epoch_times,
            "loop_seconds": float(ends[-1] - start) if ends else 0.0,
            "ema_pseudo_dice": ema, "best_epoch": best,
            "time_to_best_s": float(ends[best] - start) if best is not None else None,
            "deep_supervision": self.enable_deep_supervision, "batch_size": self.batch_size,
            "patch_size": list(self.configuration_manager.patch_size), "device": str(self.device),
        }
        with open(join(self.output_folder, "budget_log.json"), "w") as f:
            json.dump(record, f, indent=2)


class nnUNetTrainerBudgetNoDS(nnUNetTrainerBudget):  # noqa: N801
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.enable_deep_supervision = False
