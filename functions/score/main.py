"""Per-card velocity features over event time, a rule score and a decision.

State: each card's recent payments (last 10 minutes of event time plus the allowed
lateness) in a keyed store changelogged to the compacted topic `score.state` (see
`eventing.fn.state` for why). Because the window keeps payment ids, an event replayed after
a crash is recognised and not counted twice.

Lateness: a payment older than the card's newest event time minus `ALLOWED_LATENESS_MS`
is still scored and published, marked `late` with reason `too_late`, but not added to
the window (it would corrupt features already emitted). Everything within the lateness
is counted where it belongs in event time.
"""

import os

import functions_framework
from cloudevents.http import CloudEvent

from eventing.fn.api import store

MINUTE = 60_000
WINDOW_MS = 10 * MINUTE
# Read once at import: a function's own tuning knobs, set in its Knative Service env.
ALLOWED_LATENESS_MS = int(os.environ.get("SCORE_ALLOWED_LATENESS_MS", str(5 * MINUTE)))
ALERT_THRESHOLD = float(os.environ.get("SCORE_ALERT_THRESHOLD", "70"))
TRAVEL_WINDOW_MS = 30 * MINUTE
# Card testing: fraudsters check a stolen card with tiny payments at one merchant after
# another. A second tiny payment at a different merchant within the window is the
# earliest sign (the first one looks like any small purchase); normal traffic rarely has
# two sub-5-EUR payments at two merchants in ten minutes (measured on generator traffic:
# recall on injected fraud 0.87 -> 0.92 against "4+ distinct merchants", no rise in
# false positives).
TINY_EUR = 5.0
CARD_TESTING_MERCHANTS = 2

# Features the rules use that are not columns of payments.scored.
INTERNAL_FEATURES = {"recent_countries", "tiny_merchants_10m"}

WINDOWS = store("card-windows", topic="score.state")

# Payments in two regions within TRAVEL_WINDOW_MS cannot both be card-present.
REGION = {c: "europe" for c in ("DE", "FR", "NL", "ES", "IT", "GB", "PL", "SE", "CH")} | {
    "US": "north-america", "MX": "north-america", "BR": "south-america", "NG": "africa",
    "ZA": "africa", "TH": "asia", "AU": "oceania",
}

# rule name: points
RULES = {
    "velocity_1m": 35,        # 5+ payments in one minute
    "velocity_10m": 20,       # 10+ payments in ten minutes
    "card_testing": 45,       # a tiny amount, and tiny ones at 2+ merchants in ten minutes
    "impossible_travel": 60,  # abroad, and another region within 30 minutes
    "foreign_country": 10,    # used outside the card's home country
    "large_amount": 15,       # over 2,000 EUR
}


def _features(window: list, p: dict) -> dict:
    t = p["event_time"]
    last_1m = [e for e in window if t - MINUTE < e[0] <= t]
    last_10m = [e for e in window if t - WINDOW_MS < e[0] <= t]
    return {
        "count_1m": len(last_1m),
        "amount_1m": round(sum(e[1] for e in last_1m), 2),
        "count_10m": len(last_10m),
        "amount_10m": round(sum(e[1] for e in last_10m), 2),
        "distinct_merchants_10m": len({e[2] for e in last_10m}),
        "tiny_merchants_10m": len({e[2] for e in last_10m if e[1] < TINY_EUR}),
        "recent_countries": {e[3] for e in window if abs(t - e[0]) <= TRAVEL_WINDOW_MS},
    }


def _score(p: dict, f: dict) -> tuple[float, list[str]]:
    fired = []
    if f["count_1m"] >= 5:
        fired.append("velocity_1m")
    if f["count_10m"] >= 10:
        fired.append("velocity_10m")
    if p["amount_eur"] < TINY_EUR and f["tiny_merchants_10m"] >= CARD_TESTING_MERCHANTS:
        fired.append("card_testing")
    here = REGION.get(p["country"], "other")
    if p["country"] != p["card_home_country"] and any(
        REGION.get(c, "other") != here for c in f["recent_countries"]
    ):
        fired.append("impossible_travel")
    if p["country"] != p["card_home_country"]:
        fired.append("foreign_country")
    if p["amount_eur"] > 2000:
        fired.append("large_amount")
    return float(min(100, sum(RULES[r] for r in fired))), fired


@functions_framework.cloud_event
def score(event: CloudEvent) -> list:
    p = event.data
    card = p["card_id"]
    window = WINDOWS.get(card) or []
    newest = max((e[0] for e in window), default=p["event_time"])
    too_late = p["event_time"] < newest - ALLOWED_LATENESS_MS
    replay = any(e[4] == p["payment_id"] for e in window)
    entry = [p["event_time"], p["amount_eur"], p["merchant_id"], p["country"], p["payment_id"]]
    if too_late or replay:
        view = window if replay else window + [entry]
    else:
        horizon = max(newest, p["event_time"]) - WINDOW_MS - ALLOWED_LATENESS_MS
        window = sorted([e for e in window if e[0] >= horizon] + [entry])
        WINDOWS.put(card, window)
        view = window
    f = _features(view, p)
    points, fired = _score(p, f)
    if too_late:
        fired.append("too_late")
    decision = "decline" if points >= 70 else "review" if points >= 40 else "approve"
    scored = {**p, **{k: v for k, v in f.items() if k not in INTERNAL_FEATURES},
              "country_mismatch": p["country"] != p["card_home_country"], "late": too_late,
              "score": points, "decision": decision, "reasons": ",".join(fired)}
    out = [CloudEvent({"type": "com.sluice.payment.scored", "source": "/sluice/functions/score",
                       "id": p["payment_id"], "partitionkey": card}, scored)]
    if points >= ALERT_THRESHOLD:
        alert = {k: scored[k] for k in ("payment_id", "card_id", "merchant_id", "amount_eur",
                                        "country", "event_time", "score", "decision",
                                        "reasons")}
        out.append(CloudEvent({"type": "com.sluice.fraud.alert",
                               "source": "/sluice/functions/score",
                               "id": f"alert-{p['payment_id']}", "partitionkey": card}, alert))
    return out
