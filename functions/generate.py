"""Traffic generator of the payments example: card payments with injected fraud patterns.

It lives beside the topology it feeds, not in the platform: `sluice generate` loads the
`generate.py` next to the topology file and calls `run`, and `sluice up` starts that
command only when the file exists. Tests and benchmarks import it as `functions.generate`.

Realistic enough to make the fraud rules earn their keep: a few thousand cards with a
home country, merchants with categories and Zipf-like popularity, amounts log-normal
per category, most payments at home. Injected patterns (labelled out of band, in the
truth file, never in the payment itself, so the scorer cannot peek):

- card testing: one card, 6-12 tiny payments (0.50-3.00) at different merchants in
  under a minute;
- impossible travel: a card pays at home, then minutes later in a far-away country.

Reference data (cards' home countries, merchants' categories) comes from the same seed
and is what the `enrich` function loads (`functions/enrich/reference/*.csv`).
"""

from __future__ import annotations

import csv
import math
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from eventing.ingest.publish import Publisher, publish_paced

COUNTRIES = ["DE", "FR", "NL", "ES", "IT", "GB", "US", "PL", "SE", "CH"]
FAR_COUNTRIES = ["BR", "NG", "TH", "AU", "MX", "ZA"]
CURRENCY = {"DE": "EUR", "FR": "EUR", "NL": "EUR", "ES": "EUR", "IT": "EUR", "GB": "GBP",
            "US": "USD", "PL": "PLN", "SE": "SEK", "CH": "CHF", "BR": "USD", "NG": "USD",
            "TH": "USD", "AU": "USD", "MX": "USD", "ZA": "USD"}
CATEGORIES = {  # category: (median amount, sigma of log)
    "grocery": (35.0, 0.6), "fuel": (60.0, 0.4), "restaurant": (40.0, 0.7),
    "electronics": (250.0, 0.9), "travel": (400.0, 0.8), "fashion": (80.0, 0.7),
    "digital": (12.0, 0.8), "pharmacy": (20.0, 0.5),
}
# EUR per unit of each currency: the same reference rates `functions/enrich` converts with.
# Amounts are drawn in EUR and expressed in the merchant's currency, so 40 SEK is a small
# payment in Stockholm as 4 EUR is in Berlin (drawing 40 in any currency made most Swedish
# and Polish payments look like card testing).
EUR_PER_UNIT = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.05, "JPY": 0.0061,
                "SEK": 0.088, "PLN": 0.23}
EVENT_TYPE = "com.sluice.payment.created"
SOURCE = "/sluice/generator"


@dataclass(frozen=True)
class Reference:
    cards: dict[str, str]  # card_id -> home country
    merchants: dict[str, tuple[str, str]]  # merchant_id -> (category, country)


def reference(seed: int = 7, cards: int = 5000, merchants: int = 600) -> Reference:
    rng = random.Random(seed)
    card_map = {f"card-{i:05d}": rng.choices(COUNTRIES, weights=[30, 15, 10, 10, 10, 8, 7, 4,
                                                                  3, 3])[0]
                for i in range(cards)}
    merchant_map = {}
    for i in range(merchants):
        country = rng.choice(COUNTRIES + FAR_COUNTRIES) if i % 10 == 0 else rng.choice(COUNTRIES)
        merchant_map[f"m-{i:04d}"] = (rng.choice(list(CATEGORIES)), country)
    return Reference(card_map, merchant_map)


def write_reference(ref: Reference, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "cards.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["card_id", "home_country"])
        w.writerows(sorted(ref.cards.items()))
    with open(folder / "merchants.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["merchant_id", "category", "country"])
        w.writerows((m, c, k) for m, (c, k) in sorted(ref.merchants.items()))


@dataclass
class Generator:
    """Yields (payment, is_fraud) in event-time order at the caller's pace."""

    ref: Reference
    seed: int = 11
    fraud_share: float = 0.01  # share of payments that start a fraud pattern
    late_share: float = 0.002  # share of payments delivered with an old event time
    # Payment ids are `<id_prefix>-<n>`. The default adds a random run token: the same
    # seed run twice (a restarted generator) must not reuse ids, because consumers treat
    # an id they have seen as a replay (the scorer's window, the sinks' dedupe).
    id_prefix: str = ""
    rng: random.Random = field(init=False)
    _queue: list[tuple[dict, bool]] = field(default_factory=list, init=False)
    _n: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        if not self.id_prefix:
            self.id_prefix = f"pay-{self.seed}-{uuid.uuid4().hex[:6]}"
        self._cards = list(self.ref.cards)
        self._merchants = list(self.ref.merchants)
        weights = [1.0 / (i + 1) ** 0.8 for i in range(len(self._merchants))]
        self._merchant_weights = weights
        self._domestic: dict[str, list[str]] = {}
        for m, (_, country) in self.ref.merchants.items():
            self._domestic.setdefault(country, []).append(m)
        self._small_merchants = [m for m, (cat, _) in self.ref.merchants.items()
                                 if cat in ("digital", "grocery")]

    def _payment(self, card: str, merchant: str, amount_eur: float, country: str,
                 event_time: int) -> dict:
        """A payment of `amount_eur` (EUR-equivalent), in the currency of `country`."""
        self._n += 1
        currency = CURRENCY.get(country, "EUR")
        return {"payment_id": f"{self.id_prefix}-{self._n:09d}", "card_id": card,
                "merchant_id": merchant, "amount": round(amount_eur / EUR_PER_UNIT[currency], 2),
                "currency": currency, "country": country, "event_time": event_time}

    def _normal(self, now_ms: int) -> dict:
        card = self.rng.choice(self._cards)
        home = self.ref.cards[card]
        if self.rng.random() < 0.93 and self._domestic.get(home):
            merchant = self.rng.choice(self._domestic[home])
        else:
            merchant = self.rng.choices(self._merchants, self._merchant_weights)[0]
        category, m_country = self.ref.merchants[merchant]
        median, sigma = CATEGORIES[category]
        amount = math.exp(math.log(median) + self.rng.gauss(0, sigma))
        return self._payment(card, merchant, max(amount, 1.0), m_country, now_ms)

    def _card_testing(self, now_ms: int) -> list[dict]:
        card = self.rng.choice(self._cards)
        count = self.rng.randint(6, 12)
        merchants = self.rng.sample(self._small_merchants, count)
        out = []
        for i, m in enumerate(merchants):
            t = now_ms + i * self.rng.randint(2000, 5000)
            out.append(self._payment(card, m, self.rng.uniform(0.5, 3.0),
                                     self.ref.merchants[m][1], t))
        return out

    def _impossible_travel(self, now_ms: int) -> list[dict]:
        card = self.rng.choice(self._cards)
        home = self.ref.cards[card]
        home_m = self.rng.choice(self._domestic.get(home) or self._merchants)
        far = self.rng.choice(FAR_COUNTRIES)
        far_m = self.rng.choice(self._domestic.get(far) or self._merchants)
        first = self._payment(card, home_m, self.rng.uniform(20, 120), home, now_ms)
        second = self._payment(card, far_m, self.rng.uniform(300, 1500), far,
                               now_ms + self.rng.randint(60_000, 240_000))
        return [first, second]

    def next(self, now_ms: int) -> tuple[dict, bool]:
        """The next payment (event time ≈ now_ms) and whether it is injected fraud."""
        due = [i for i, (p, _) in enumerate(self._queue) if p["event_time"] <= now_ms]
        if due:
            return self._queue.pop(due[0])
        r = self.rng.random()
        if r < self.fraud_share / 2:
            burst = self._card_testing(now_ms)
            self._queue.extend((p, True) for p in burst[1:])
            return burst[0], True
        if r < self.fraud_share:
            first, second = self._impossible_travel(now_ms)
            self._queue.append((second, True))
            return first, False  # the home payment itself is legitimate
        p = self._normal(now_ms)
        if self.rng.random() < self.late_share:
            p["event_time"] = now_ms - self.rng.randint(30_000, 600_000)
        return p, False


def event_for(payment: dict) -> dict:
    """The structured-mode CloudEvent the generator publishes for a payment."""
    return {"specversion": "1.0", "id": payment["payment_id"], "source": SOURCE,
            "type": EVENT_TYPE, "partitionkey": payment["card_id"],
            "datacontenttype": "application/json", "data": payment}


def run(publisher: Publisher, *, rate: float, duration: float, seed: int = 11,
        inject_share: float = 0.01, truth: Path | None = None,
        progress: Callable[[int], None] | None = None) -> tuple[int, int]:
    """Publish generated payments through `publisher` (the platform's paced loop,
    `eventing.ingest.publish.publish_paced`: this example supplies only its events).

    `duration` 0 runs until interrupted. `inject_share` of payments start a fraud pattern
    (`sluice generate --inject-share`); injected fraud payment ids are appended to `truth`
    (one per line) so tests and humans can measure detection rates. Returns (payments
    sent, of which fraud).
    """
    gen = Generator(reference(), seed=seed, fraud_share=inject_share)

    def make(now_ms: int) -> tuple[dict, bool]:
        payment, is_fraud = gen.next(now_ms)
        return event_for(payment), is_fraud

    return publish_paced(publisher, make, rate=rate, duration=duration, truth=truth,
                         progress=progress)
