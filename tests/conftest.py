"""Shared fixtures: tiny synthetic datasets, planned and trained once per test session.

Everything runs on the CPU with tiny shapes and a tiny network, so the suite stays fast on
2 cores. Tests that need the real data in ../shared skip when it is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real-ms-isbi"
TINY_SHAPE = (40, 44, 32)
TINY_ARCH = {"base_channels": 4, "max_channels": 32, "depth": 3}
# BatchNorm statistics as training kept them: the tiny models' other tests (int8 agreement, ...) are tuned to them;
# tests/test_train.py runs the pass that new plans do after the last epoch
TINY_OVERRIDES = {"arch_kwargs": TINY_ARCH, "batch_size": 8, "num_workers": 0, "inference_batch_size": 32,
                  "bn_recalibration_batches": 0}


@pytest.fixture
def dirs(tmp_path):
    from mslpipe.plans import Workdirs

    return Workdirs.resolve(tmp_path / "raw_data", tmp_path / "plans", tmp_path / "preprocessed",
                            tmp_path / "results")


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """5 subjects × 2 time points, two raters, ISBI layout (read-only: copy before changing)."""
    from mslpipe.synth import make_dataset

    root = tmp_path_factory.mktemp("synth") / "syn"
    make_dataset(root, subjects=5, timepoints=2, shape=TINY_SHAPE, seed=3)
    return root


@pytest.fixture
def scan_path(synth_root):
    """One synthetic FLAIR scan (read-only)."""
    return next((synth_root / "training").glob("training01/preprocessed/*_flair_pp.nii.gz"))


@pytest.fixture(scope="session")
def planned(tmp_path_factory, synth_root):
    """The synthetic dataset planned for the CPU with a tiny network (session-wide, read-only)."""
    from mslpipe import plan
    from mslpipe.plans import Workdirs

    base = tmp_path_factory.mktemp("planned")
    d = Workdirs.resolve(base / "raw", base / "plans", base / "pre", base / "results")
    result = plan.run("syn", d, input_path=synth_root, device="cpu", overrides=TINY_OVERRIDES)
    return d, result


@pytest.fixture(scope="session")
def trained(planned):
    """Fold 0 trained for 2 short epochs (session-wide, read-only)."""
    from mslpipe import train

    d, _ = planned
    result = train.run("syn", d, 0, epochs=2, iterations=3, device="cpu", show_progress=False)
    return d, result


@pytest.fixture
def real_data() -> Path:
    if not (REAL_DATA / "training").is_dir():
        pytest.skip("real data not present at ../shared/data/real-ms-isbi")
    return REAL_DATA
