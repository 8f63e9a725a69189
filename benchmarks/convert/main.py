"""Add the amount in EUR: the function of the benchmarks' job (payments.raw -> converted).

Benchmark code, not part of the example pipeline: every contender runs this same job,
and its output schema is `benchmarks/schemas/payments.converted.avsc`, which the
benchmarks register themselves.
"""

import functions_framework
from cloudevents.http import CloudEvent

# Reference rates loaded once; a real deployment would read them from the lake.
EUR_PER_UNIT = {"EUR": 1.0, "USD": 0.92, "GBP": 1.17, "CHF": 1.05, "JPY": 0.0061,
                "SEK": 0.088, "PLN": 0.23}


@functions_framework.cloud_event
def convert(event: CloudEvent) -> dict | None:
    p = event.data
    if p["amount"] <= 0:  # nothing to convert; validate normally stops these earlier
        return None
    p["amount_eur"] = round(p["amount"] * EUR_PER_UNIT[p["currency"]], 2)
    return p
