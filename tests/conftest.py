"""Fixtures shared by the tests; plain helpers live in helpers.py."""

from __future__ import annotations

from typing import Any

import pytest
import yaml
from helpers import REPO


@pytest.fixture
def committed_params() -> dict[str, Any]:
    return yaml.safe_load((REPO / "params.yaml").read_text())
