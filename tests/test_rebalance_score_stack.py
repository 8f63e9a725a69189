"""Two replicas of the example's `score` in one group, rebalanced mid-stream, against a
single-replica run of the same input: the lake must not be able to tell them apart.

Issue 13's "done when": every payment scored exactly once in the lake table, window
counts equal to a single-replica run on the same input. Both runs go through the whole
example pipeline `sluice up` started (gateway -> validate -> enrich -> score -> lake
sink), so score's keyed state (`card-windows` on `score.state`) is the real one.

- Reference: the input published while only the stack's own `fn-score` runs.
- Rebalanced: the same input under other card and payment ids, paced so it flows while
  a second `score` process (the same command `up` runs, another metrics port) joins the
  group `sluice-score`, then the stack's `fn-score` is killed with SIGKILL (its uncommitted
  records replay on the survivor; the supervisor restarts it and it rejoins), then the
  second replica leaves with SIGTERM. Four rebalances, one of them a crash.

Cards are this test's own (`rb...-cNN`, unknown to enrich: home country `ZZ` for both
runs), so no other test's payments share a window. Event times are fixed offsets from
one base: uneven steps, out-of-order payments within the allowed lateness and one too
late per card, so the windows count, prune and reject as they do for real traffic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter

import pytest

from eventing.stack.settings import StackSettings
from eventing.stack.supervisor import Stack
from eventing.tables.lakehouse import LakeConfig, duckdb_connect
from tests.helpers import ROOT, free_port, stop_process, wait_until
from tests.test_fraud_pipeline import (
    kill_and_restart,
    lake_ids,
    metric,
    paced,
    publish,
    query_cli,
)

# Its own ~3 minutes, plus the session stack's start and stop when run alone (load ~20).
pytestmark = [pytest.mark.stack, pytest.mark.timeout(900)]

CARDS = 30
PER_CARD = 40  # 1,200 payments per run
RATE = 12.0  # payments/s of the rebalanced run: ~100 s of stream for four rebalances
MERCHANTS = [f"m-rb{i}" for i in range(7)]
COUNTRIES = ["DE", "DE", "FR", "DE", "US", "DE", "NL", "DE", "TH"]
AMOUNTS = [3.5, 12.0, 48.9, 2.1, 250.0, 19.99, 4.2, 2300.0, 75.5, 1.0, 33.3]
CURRENCIES = ["EUR", "EUR", "USD", "EUR", "GBP"]
# What score computes from a card's window (and what follows from it): must match.
WINDOW_FIELDS = ("count_1m", "amount_1m", "count_10m", "amount_10m", "distinct_merchants_10m",
                 "country_mismatch", "late", "score", "decision", "reasons")


def payments(prefix: str, base_ms: int) -> list[dict]:
    """The fixed input under `prefix` (card `<prefix>-cNN`, payment `<prefix>-NN-MM`).

    Per card 40 payments 7-35 s apart in event time (~14 minutes: the 10-minute window
    fills, old entries are pruned); every 7th is 45 s older than the one before it
    (late, within the 5-minute lateness: counted where it belongs), the 18th is 6
    minutes older (too late: scored, not counted). Published card after card, round
    after round, so every partition carries a stream.
    """
    rounds: list[list[dict]] = [[] for _ in range(PER_CARD)]
    for c in range(CARDS):
        t = base_ms + c * 1000
        for j in range(PER_CARD):
            t += (7 + (c * 5 + j * 11) % 29) * 1000
            event_time = t - 360_000 if j == 17 else t - 45_000 if j % 7 == 6 else t
            rounds[j].append({
                "payment_id": f"{prefix}-{c:02d}-{j:02d}", "card_id": f"{prefix}-c{c:02d}",
                "merchant_id": MERCHANTS[(c + j * 3) % len(MERCHANTS)],
                "amount": AMOUNTS[(c * 7 + j) % len(AMOUNTS)],
                "currency": CURRENCIES[(c + j) % len(CURRENCIES)],
                "country": COUNTRIES[(c * 3 + j * 5) % len(COUNTRIES)],
                "event_time": event_time})
    return [p for r in rounds for p in r]


def _spec(settings: StackSettings, name: str):
    stack = Stack(settings)
    return next(spec for f in stack.factories if (spec := f(settings)).name == name)


def start_second_replica(settings: StackSettings, log_path) -> tuple[subprocess.Popen, int]:
    """`fn-score`'s own command (`sluice up` builds it) with another metrics port: a
    second member of the group `sluice-score`, started by this test, not supervised."""
    spec = _spec(settings, "fn-score")
    port = free_port()
    argv = list(spec.argv)
    argv[argv.index("--metrics-port") + 1] = str(port)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")} | spec.env
    proc = subprocess.Popen(argv, cwd=spec.cwd or ROOT, env=env, stdout=log_path.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
    return proc, port


def consumed(port: int) -> float:
    """Records a score process consumed (its dispatcher's counter; 0 while unreachable)."""
    try:
        return metric(f"http://127.0.0.1:{port}/metrics",
                      "sluice_function_events_consumed_total")
    except Exception:  # noqa: BLE001 - not listening yet, or gone
        return 0.0


def wait_lake(con, prefix: str, expected: int, timeout: float) -> Counter:
    """Poll the lake until every expected payment is there, then a few commits more."""
    wait_until(lambda: len(lake_ids(con, prefix)) >= expected, timeout,
               f"{expected} payments {prefix}* in the lake", interval=0.5)
    time.sleep(3.0)  # a row written twice shows within a commit or two
    return lake_ids(con, prefix)


def scored_rows(settings: StackSettings, prefix: str) -> list[dict]:
    """The lake's rows of one run, through the project's query path (`sluice query`)."""
    cols = ", ".join(WINDOW_FIELDS)
    return query_cli(settings, f"SELECT payment_id, {cols} FROM payments_scored "
                               f"WHERE starts_with(payment_id, '{prefix}-')")


def test_two_score_replicas_rebalanced_mid_stream_match_a_single_replica_run(
        pipeline, tmp_path) -> None:
    tag = uuid.uuid4().hex[:6]
    ref_prefix, reb_prefix = f"rb{tag}r", f"rb{tag}s"
    base_ms = int(time.time() * 1000) - 20 * 60_000
    reference, rebalanced = payments(ref_prefix, base_ms), payments(reb_prefix, base_ms)
    n = len(reference)
    con = duckdb_connect(LakeConfig.from_settings(pipeline))
    score_port = _spec(pipeline, "fn-score").ports[0]

    # 1. The single-replica reference: only the stack's fn-score is in the group.
    assert publish(pipeline, reference) == n
    ref_lake = wait_lake(con, ref_prefix, n, timeout=120)

    # 2. The same input, flowing while the group changes under it.
    sent: list[int] = []
    publisher = threading.Thread(target=lambda: sent.append(
        publish(pipeline, paced(rebalanced, RATE), batch_size=20)))
    second = None
    events: list[str] = []
    t0 = time.monotonic()
    publisher.start()
    try:
        wait_until(lambda: len(lake_ids(con, reb_prefix)) >= n // 10, 60,
                   "the first tenth of the stream in the lake", interval=0.3)
        second, second_port = start_second_replica(pipeline, tmp_path / "score-2.log")
        wait_until(lambda: consumed(second_port) > 0, 60,
                   "the second replica to get partitions and records", interval=0.3)
        events.append(f"replica 2 joined and consumed at {time.monotonic() - t0:.0f}s")
        score_before = consumed(score_port)
        wait_until(lambda: consumed(score_port) > score_before, 30,
                   "fn-score to consume after the join (it kept partitions)", interval=0.3)
        restart_s, _ = kill_and_restart(pipeline, "fn-score", signal.SIGKILL, timeout=120)
        events.append(f"fn-score killed (-9) and restarted by the supervisor in "
                      f"{restart_s:.0f}s, at {time.monotonic() - t0:.0f}s")
        # Back in the group: it takes partitions from replica 2 again.
        wait_until(lambda: consumed(score_port) > 0, 60,
                   "the restarted fn-score to get partitions and records", interval=0.3)
        in_lake = len(lake_ids(con, reb_prefix))
        stop_process(second, timeout=30, group=True)  # leaves: the last rebalance
        events.append(f"replica 2 stopped (SIGTERM) at {time.monotonic() - t0:.0f}s with "
                      f"{in_lake}/{n} payments in the lake")
        publisher.join(180)
        assert sent == [n], "the rebalanced input was not all accepted by the gateway"
        reb_lake = wait_lake(con, reb_prefix, n, timeout=120)
    finally:
        if second is not None:
            stop_process(second, timeout=30, group=True)
        publisher.join(180)
    log_tail = (tmp_path / "score-2.log").read_text()[-3000:]
    print(f"\n{'; '.join(events)}; all in the lake at {time.monotonic() - t0:.0f}s")
    # The group really changed while the stream flowed: the last rebalance landed before
    # the stream's end (otherwise this run proves less than it claims).
    assert in_lake < n, "the stream ended before the rebalances: raise PER_CARD or lower RATE"

    # Every payment exactly once in the lake, in both runs.
    for prefix, lake in ((ref_prefix, ref_lake), (reb_prefix, reb_lake)):
        ids = {p["payment_id"] for p in (reference if prefix == ref_prefix else rebalanced)}
        assert lake == Counter(dict.fromkeys(ids, 1)), (
            f"{prefix}: {len(ids - set(lake))} missing, "
            f"{sum(1 for v in lake.values() if v > 1)} duplicated\n{log_tail}")

    # Each payment's window fields as the single replica computed them.
    ref_rows = {r["payment_id"][len(ref_prefix):]: r for r in scored_rows(pipeline, ref_prefix)}
    reb_rows = {r["payment_id"][len(reb_prefix):]: r for r in scored_rows(pipeline, reb_prefix)}
    assert len(ref_rows) == len(reb_rows) == n
    differ = {k: {f: (ref_rows[k][f], reb_rows[k][f]) for f in WINDOW_FIELDS
                  if ref_rows[k][f] != reb_rows[k][f]}
              for k in ref_rows}
    differ = {k: v for k, v in differ.items() if v}
    assert not differ, (f"{len(differ)} of {n} payments scored differently from the "
                        f"single-replica run (reference, rebalanced), e.g. "
                        f"{dict(sorted(differ.items())[:5])}\n{log_tail}")
    # The input exercised the windows: counts grew, late ones were set apart.
    assert max(r["count_10m"] for r in ref_rows.values()) >= 10
    assert sum(r["late"] for r in ref_rows.values()) == CARDS
