"""Fixtures of the torch backend's tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def count_calls(monkeypatch):
    """``count_calls(cls) -> {"n": calls}``: counts the calls of ``cls.__call__`` from then on
    (how a test proves that a lowering path was taken)."""
    def install(cls) -> dict:
        counter = {"n": 0}
        original = cls.__call__

        def counted(self, *args, **kwargs):
            counter["n"] += 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "__call__", counted)
        return counter

    return install
