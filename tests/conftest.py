"""The store backends every store test runs against (tests/test_store.py, tests/test_pins_store.py).

A store test takes the ``store`` fixture (a started store, stopped after the test) and, to stop
and start again on the same database, ``store_backend`` (every store it opened is stopped after
the test).  It runs once per entry of BACKENDS and
sees only IStore, so a second backend runs the suite unchanged: add its name and a context
manager that makes an empty database for one test and yields its ``--database`` URL (skipping
when no server is configured), and teach ``open_store`` that URL; e.g. for PostgreSQL, create a
database named after the test from a server URL in an environment variable, yield
``postgresql://…/that-db``, drop it afterwards.

Stores are opened with a key (``Backend.sealer``, one per test), so every store test runs on
sealed secrets; ``open(sealer=None)`` opens one without.

A test that must look at one backend's internals (a file-level check, a ``PRAGMA``) says which
with ``@pytest.mark.backends("sqlite")``: it is skipped for the others.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, AsyncIterator, Callable, ContextManager, Iterator

import pytest
import pytest_twisted
from twisted.internet import reactor

from gateway.seal import Sealer
from gateway.store import open_store

_DEFAULT = object()


@contextmanager
def sqlite_database(tmp_path: Any) -> Iterator[str]:
    yield f"sqlite:{tmp_path / 's.sqlite'}"


# name -> (tmp_path -> context manager yielding an empty database's URL)
BACKENDS: dict[str, Callable[[Any], ContextManager[str]]] = {
    "sqlite": sqlite_database,
}


def pytest_configure(config: Any) -> None:
    config.addinivalue_line("markers", "backends(*names): a store test that runs only on these "
                                       "backends (it looks at their internals)")


class Backend:
    """One test's database on one backend: opens stores on it and stops them afterwards."""

    def __init__(self, name: str, url: str) -> None:
        self.name = name
        self.url = url
        self.running: list[Any] = []
        self.sealer = Sealer.generate("the test's key")

    async def open(self, sealer: Any = _DEFAULT) -> Any:
        """A started store on this database (migrated by its start), sealing with
        ``sealer`` (default: the test's key; None: none).  Stopped after the test, and at
        once when its start fails."""
        store = open_store(self.url, reactor,
                           sealer=self.sealer if sealer is _DEFAULT else sealer)
        try:
            await store.start()
        except BaseException:
            await store.stop()
            raise
        self.running.append(store)
        return store

    async def close(self, store: Any) -> None:
        self.running.remove(store)
        await store.stop()

    async def reopen(self, store: Any) -> Any:
        """Stop ``store`` and start another on the same database: a restart."""
        await self.close(store)
        return await self.open()

    async def close_all(self) -> None:
        while self.running:
            await self.close(self.running[-1])


@pytest.fixture(params=list(BACKENDS))
def store_database(request: Any, tmp_path: Any) -> Iterator[tuple[str, str]]:
    """(backend name, URL of an empty database), once per backend."""
    only = request.node.get_closest_marker("backends")
    if only is not None and request.param not in only.args:
        pytest.skip(f"looks at the internals of {', '.join(only.args)}, not {request.param}")
    with BACKENDS[request.param](tmp_path) as url:
        yield request.param, url


@pytest_twisted.async_yield_fixture
async def store_backend(store_database: tuple[str, str]) -> AsyncIterator[Backend]:
    """The test's database: open (and restart) stores on it; all are stopped afterwards."""
    backend = Backend(*store_database)
    yield backend
    await backend.close_all()


@pytest_twisted.async_fixture
async def store(store_backend: Backend) -> Any:
    """A started store on an empty database of each backend."""
    return await store_backend.open()
