"""Every test starts from the same global RNG state."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the packaged MiniLM is local; never reach for the hub


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
