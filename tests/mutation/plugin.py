"""pytest plugin loaded in every mutation run (``-p tests.mutation.plugin``, see setup.cfg [mutmut]).

Each mutant is judged by the fast unit suite alone, the same way every time:

* Hypothesis draws its examples from a fixed seed and keeps no example database, so a failure
  found for one mutant is not replayed against the next one and a rerun gives the same verdicts.
* A test that starts a process (``subprocess`` or ``reactor.spawnProcess``) is skipped, not run:
  a mutant is killed by what the gateway does in-process, never by a child process that imports
  the unmutated code, and never by a slow start-up hitting the time limit.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

PROCESS_SKIP = "starts a process: not part of the mutation suite"


def _refuse(*args: Any, **kwargs: Any) -> Any:
    pytest.skip(PROCESS_SKIP)


def pytest_configure(config: pytest.Config) -> None:
    try:
        from hypothesis import settings
    except ImportError:  # pragma: no cover - hypothesis is part of the test extra
        return
    settings.register_profile("mutation", derandomize=True, database=None, print_blob=False)
    settings.load_profile("mutation")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    from twisted.internet import reactor

    saved_popen = subprocess.Popen.__init__
    saved_spawn = getattr(reactor, "spawnProcess", None)
    subprocess.Popen.__init__ = _refuse  # type: ignore[method-assign]
    if saved_spawn is not None:
        reactor.spawnProcess = _refuse  # type: ignore[attr-defined]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = saved_popen  # type: ignore[method-assign]
        if saved_spawn is not None:
            reactor.spawnProcess = saved_spawn  # type: ignore[attr-defined]
