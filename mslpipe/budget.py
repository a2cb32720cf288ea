"""Training for a wall-clock budget instead of a fixed number of epochs (`mslpipe train --minutes`).

The rule is nnU-Net's budget trainer's in ``bench/nnunet/trainers``, so that a comparison of the two
systems gives both the same minutes by the same rule: whole epochs (validation included) run while the
next one, at the mean length of the last three, still fits into the budget; at least one runs. The poly
learning-rate schedule spans the epochs the budget is expected to hold, re-estimated after every epoch,
so the rate decays towards zero at the end of the budget as it would at the end of a fixed run. What runs
after the last epoch on the budget's time (the BatchNorm statistics estimated again, a share ``after`` of an
epoch) is kept free: an epoch runs only when it and that still fit.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class EpochBudget:
    """``seconds`` of training, at most ``cap`` epochs, ``after`` epochs' worth of work kept free for after the
    last one. ``spent`` and ``epoch_s`` carry a resumed run's past."""

    seconds: float
    cap: int = 1000
    spent: float = 0.0
    epoch_s: list[float] = field(default_factory=list)
    after: float = 0.0

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ValueError(f"a training budget must be positive, not {self.seconds / 60:g} minutes")
        if self.cap < 1:
            raise ValueError(f"the epoch cap must be at least 1, not {self.cap}")

    def total(self, done: int) -> int:
        """How many epochs the run is expected to have in all after ``done`` epochs: the loop's end and the
        length of the learning-rate schedule. Equal to ``done`` when the next epoch would not fit."""
        if not self.epoch_s:
            return self.cap  # nothing timed yet: the cap, as nnU-Net's 1000 epochs
        recent = sum(self.epoch_s[-3:]) / len(self.epoch_s[-3:])
        free = self.seconds - self.spent - self.after * recent
        if recent > free:
            return min(done, self.cap)
        return min(self.cap, done + max(1, int(free // max(recent, 1e-6))))

    def add(self, seconds: float) -> None:
        """One more epoch took ``seconds``."""
        self.epoch_s.append(float(seconds))
        self.spent += float(seconds)

    def state(self) -> dict:
        return {"seconds": self.seconds, "cap": self.cap, "spent": self.spent, "epoch_s": list(self.epoch_s),
                "after": self.after}
