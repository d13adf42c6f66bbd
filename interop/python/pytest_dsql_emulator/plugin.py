"""pytest fixtures: ``dsql_emulator`` (one emulator for the session) and ``dsql_endpoint``
(an endpoint of each test's own, dropped after it). Installed with the package (``pip install
./interop/python``); the binary comes from ``$DSQL_EMULATOR`` or ``PATH``."""

import pytest

from . import Emulator


@pytest.fixture(scope="session")
def dsql_emulator():
    """The session's ``dsql-emulator``: started once, stopped at the end (and with the test
    runner if that is killed)."""
    emulator = Emulator.start()
    yield emulator
    emulator.stop()


@pytest.fixture
def dsql_endpoint(dsql_emulator):
    """An endpoint of the test's own: its own database, counters, faults and limits."""
    endpoint = dsql_emulator.endpoint()
    yield endpoint
    endpoint.close()
