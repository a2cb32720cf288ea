"""Training for a wall-clock budget: nnU-Net's rule (whole epochs while the next one fits)."""

import pytest

from mslpipe.budget import EpochBudget


def test_untimed_runs_plan_for_the_cap():
    assert EpochBudget(60).total(0) == 1000 and EpochBudget(60, cap=5).total(0) == 5


def test_whole_epochs_while_the_next_one_fits():
    b = EpochBudget(100)
    b.add(30)
    assert b.total(1) == 3  # 70 s left hold 2 more epochs of 30 s
    b.add(30)
    b.add(30)
    assert b.total(3) == 3  # 90 s spent: a fourth epoch of 30 s would end at 120 s
    b = EpochBudget(100)
    for _ in range(3):
        b.add(25)
    assert b.total(3) == 4  # 75 + 25 = 100 still fits, exactly


def test_the_last_three_epochs_set_the_pace():
    b = EpochBudget(200)
    for seconds in (100, 10, 10, 10):  # a slow first epoch (start-up), then fast ones
        b.add(seconds)
    assert b.total(4) == 4 + 7  # 200 - 130 = 70 s left, at 10 s an epoch


def test_at_least_one_epoch_and_never_past_the_cap():
    b = EpochBudget(1, cap=3)
    assert b.total(0) == 3
    b.add(50)  # the first epoch alone overran the budget: it stops there
    assert b.total(1) == 1
    b = EpochBudget(1000, cap=3)
    b.add(1)
    assert b.total(1) == 3


def test_a_budget_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        EpochBudget(0)
    with pytest.raises(ValueError, match="cap"):
        EpochBudget(10, cap=0)
    state = EpochBudget(60, cap=4, spent=10.0, epoch_s=[10.0]).state()
    assert state == {"seconds": 60, "cap": 4, "spent": 10.0, "epoch_s": [10.0], "after": 0.0}


def test_work_after_the_last_epoch_is_kept_free_in_the_budget():
    """``after``: a share of an epoch that runs after the last one (the BatchNorm pass) counts against the budget,
    so an epoch that would fit alone but not with it does not start."""
    b, kept = EpochBudget(100), EpochBudget(100, after=0.5)
    for budget in (b, kept):
        for _ in range(8):
            budget.add(10.0)
    assert b.total(8) == 10  # 20 s left: two more epochs of 10 s
    assert kept.total(8) == 9  # 20 s left, 5 s of them kept free: one more
    kept.add(10.0)
    assert kept.total(9) == 9  # 10 s left, 5 kept free: the next epoch would not fit
