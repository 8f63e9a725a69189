"""The one traffic loop every example's generate.py uses (`publish_paced`): counts,
batches, the truth file, and each example's `run` supplying only its events."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from eventing.ingest.publish import publish_paced
from tests.helpers import ROOT


class FakePublisher:
    """Takes what `send_many` gets, batch by batch, as the gateway would accept it."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []

    def send_many(self, events: Iterable[dict[str, Any]], batch_size: int = 500,
                  progress: Callable[[int], None] | None = None) -> int:
        batch: list[dict[str, Any]] = []
        for event in events:
            batch.append(event)
            if len(batch) == batch_size:
                self.batches.append(batch)
                batch = []
        if batch:
            self.batches.append(batch)
        return sum(len(b) for b in self.batches)


def test_publish_paced_sends_rate_times_duration_and_writes_flagged_ids(tmp_path: Path) -> None:
    made: list[int] = []

    def make(now_ms: int) -> tuple[dict, bool]:
        made.append(now_ms)
        n = len(made)
        return {"id": f"e-{n}", "type": "t", "source": "/s", "data": {}}, n % 7 == 0

    pub = FakePublisher()
    truth = tmp_path / "truth.txt"
    sent, flagged = publish_paced(pub, make, rate=400, duration=0.25, truth=truth)
    assert sent == 100 and flagged == 14
    assert [len(b) for b in pub.batches] == [20] * 5  # rate/20 per batch
    assert truth.read_text().split() == [f"e-{n}" for n in range(7, 101, 7)]
    assert made == sorted(made) and made[0] > 1_700_000_000_000  # event time is now, in ms


def _load(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_each_example_supplies_only_its_events_to_the_shared_loop(tmp_path: Path) -> None:
    for path, id_field in ((ROOT / "functions" / "generate.py", "payment_id"),
                           (ROOT / "examples" / "iot" / "generate.py", "reading_id")):
        gen = _load(path, f"gen_{path.parent.name}")
        pub = FakePublisher()
        truth = tmp_path / f"{path.parent.name}.txt"
        sent, flagged = gen.run(pub, rate=1000, duration=0.3, inject_share=0.2, truth=truth)
        events = [e for b in pub.batches for e in b]
        assert sent == len(events) == 300
        assert all(e["id"] == e["data"][id_field] for e in events)
        assert flagged > 0 and len(truth.read_text().split()) == flagged
        assert set(truth.read_text().split()) <= {e["id"] for e in events}
