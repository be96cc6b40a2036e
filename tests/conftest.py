"""Shared fixtures: composed configs and a small built federation store."""

from __future__ import annotations

import pytest

from snowfed.config import compose
from snowfed.sim.runner import plain_config


@pytest.fixture
def smoke_cfg() -> dict:
    return plain_config(compose(["federation=smoke"]))


@pytest.fixture
def smoke_store(smoke_cfg, tmp_path):
    from snowfed.sim.runner import prepare

    _, store = prepare(smoke_cfg, tmp_path / "run")
    return store
