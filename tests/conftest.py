"""Shared fixtures: deterministic seeds and a fresh 'warn once' state for every test."""

import os

import pytest
import torch

# Triton decides at decoration time whether its kernels are compiled or interpreted, and any test may import
# them first (a dispatch test, a doctest): without a GPU, switch the interpreter on before any test runs.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import normdecouple.functional as functional


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_warning_state(monkeypatch):
    """Lets a test see the once-per-process non-finite warning again."""
    monkeypatch.setattr(functional, "_nonfinite_warned", False)
