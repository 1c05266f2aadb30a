"""Shared fixtures: deterministic seeds and a fresh 'warn once' state for every test."""

import pytest
import torch

import normdecouple.functional as functional


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def fresh_warning_state(monkeypatch):
    """Lets a test see the once-per-process non-finite warning again."""
    monkeypatch.setattr(functional, "_nonfinite_warned", False)
