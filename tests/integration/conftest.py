"""Fixtures of the real-daemon tests."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.harness import Processes


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    """The processes of one test; all killed at teardown (their logs printed, so that a
    failing test shows them under "Captured stdout teardown")."""
    group = Processes(tmp_path)
    try:
        yield group
    finally:
        group.close()
        print(group.tails())
