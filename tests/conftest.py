"""Shared fixtures: one real local stack per test session, on shifted ports.

The stack is started through the same CLI a user runs (`sluice up`), with memory
storage for speed, in a temporary state folder, and stopped (`sluice down --purge`) at
the end, so the suite never touches a developer's running stack.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from eventing.stack.settings import Ports, StackSettings, load_settings
from tests.helpers import free_port_offset, sluice

# Fixtures that start (or stand on) the real stack; a test using one is a `stack` test.
STACK_FIXTURES = frozenset({"stack", "pipeline"})


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: it must see the marker
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that uses the real stack, so `-m "not stack"` starts nothing.

    Belt and braces: modules and tests mark themselves too; this catches a test that asks
    for the stack only through another fixture (`fixturenames` is the whole closure).
    """
    for item in items:
        if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.stack)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackSettings]:
    """The running infrastructure (memory broker storage) for the whole session."""
    state = tmp_path_factory.mktemp("stack") / "state"
    offset = free_port_offset()
    try:
        sluice("up", "--storage", "memory", "--no-pipeline", state_dir=state, offset=offset)
        yield load_settings(state_dir=state, port_offset=offset, broker_storage="memory")
    finally:
        sluice("down", "--purge", state_dir=state, offset=offset, check=False)


@pytest.fixture(scope="session")
def pipeline(stack: StackSettings) -> StackSettings:
    """The example pipeline (gateway + functions of functions/topology.yaml) on `stack`,
    added by a second `sluice up` exactly as a user would."""
    offset = stack.ports.broker - Ports().broker
    sluice("up", "--no-generator", state_dir=stack.state_dir, offset=offset)
    return stack
