"""pytest plugin loaded in every mutation run (``-p tests.mutation.plugin``, see setup.cfg [mutmut]).

Each mutant is judged by the fast unit suite alone, the same way every time:

* Hypothesis draws its examples from a fixed seed and keeps no example database, so a failure
  found for one mutant is not replayed against the next one and a rerun gives the same verdicts.
* A test that starts a process (``subprocess`` or ``reactor.spawnProcess``) is skipped, not run:
  a mutant is killed by what the gateway does in-process, never by a child process that imports
  the unmutated code, and never by a slow start-up hitting the time limit.
* A test that has not finished after ``TEST_DEADLINE`` seconds of wall-clock time ends the run as a
  timeout (a kill).  mutmut's own limit counts CPU seconds, and a mutant that leaves a Deferred
  unfired (a request never answered) idles in the reactor at no CPU cost: each such mutant would
  otherwise hold a worker for a minute.  No unit test comes near the deadline unmutated.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

PROCESS_SKIP = "starts a process: not part of the mutation suite"
TEST_DEADLINE = int(os.environ.get("MUTATE_TEST_DEADLINE", "10"))
TIMEOUT_EXIT = 36  # mutmut's exit code for "timeout", which it counts as killed
# MUTANT_UNDER_TEST values of mutmut's own runs (mutmut.__main__).
_NOT_A_MUTANT = {"", "stats", "fail", "list_all_tests", "mutant_generation"}


def _deadline(signum: int, frame: Any) -> None:
    sys.stderr.write(f"mutation plugin: a test ran over {TEST_DEADLINE} s; counted as a timeout\n")
    sys.stderr.flush()
    os._exit(TIMEOUT_EXIT)


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
    # Only while a mutant is tried: the stats run (every test, traced) and the clean and
    # forced-fail runs are slower and are not verdicts.
    timed = os.environ.get("MUTANT_UNDER_TEST", "") not in _NOT_A_MUTANT
    saved_alarm = signal.signal(signal.SIGALRM, _deadline)
    if timed:
        signal.alarm(TEST_DEADLINE)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, saved_alarm)
        subprocess.Popen.__init__ = saved_popen  # type: ignore[method-assign]
        if saved_spawn is not None:
            reactor.spawnProcess = saved_spawn  # type: ignore[attr-defined]
