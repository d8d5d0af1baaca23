"""Run the backend suite backend by backend: latency at each batch, then accuracy, then the next backend.

pytest's own order would time every backend before scoring any, so a run stopped early (a time limit, Ctrl-C;
``python -m bench`` still writes its report then) would keep latency rows without their mIoU. Grouped, every
backend that finished has its whole row. The kernel microbenchmarks keep their order.
"""
from __future__ import annotations

from typing import Any


def pytest_collection_modifyitems(session: Any, config: Any, items: list[Any]) -> None:
    positions = [i for i, item in enumerate(items) if _backend_of(item) is not None]
    if not positions:
        return
    from bench.backends import BACKENDS

    order = {spec.name: i for i, spec in enumerate(BACKENDS)}
    grouped = sorted((items[i] for i in positions),
                     key=lambda item: (order.get(_backend_of(item), len(order)), item.name.startswith("test_accuracy")))
    for i, item in zip(positions, grouped):
        items[i] = item


def _backend_of(item: Any) -> str | None:
    """The backend name of a test_backends.py item, else None."""
    if not item.nodeid.split("::")[0].endswith("test_backends.py"):
        return None
    spec = getattr(getattr(item, "callspec", None), "params", {}).get("spec")
    return getattr(spec, "name", None)
