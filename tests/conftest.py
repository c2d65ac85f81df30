"""Every test starts from the same global RNG state and leaves no global module hook behind."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged MiniLM is local; never reach for the hub
if os.environ.get("PYTEST_XDIST_WORKER"):  # `pytest -n N`: one thread per worker (and per process it starts)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield


@pytest.fixture(autouse=True)
def _no_global_hooks_left_behind():
    """A test that leaves SAM between first_step() and second_step() leaves its BatchNorm guard's global
    forward hook registered, which every later test would then run under; each test must restore()."""
    hooks = torch.nn.modules.module._global_forward_pre_hooks
    before = len(hooks)
    yield
    assert len(hooks) == before, "a global forward pre-hook was left registered: call opt.restore()"
