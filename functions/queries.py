"""The payments example's queries: the ones its README shows, kept here so tests run them.

They belong to the example, not the platform: `sluice query` answers any SQL over the
declared tables; these name the fraud pipeline's tables and columns.
"""

EXAMPLES: dict[str, str] = {
    "top_risky_merchants_5m": """
        -- Merchants with the most flagged payments in the last 5 minutes (real-time table).
        SELECT merchant_id,
               count(*) AS payments,
               count_if(decision <> 'approve') AS flagged,
               round(avg(score), 1) AS avg_score,
               approx_distinct(card_id) AS cards,
               round(sum(amount_eur), 2) AS amount_eur
        FROM payments_scored_rt
        WHERE event_time >= current_timestamp - INTERVAL '5' MINUTE
        GROUP BY merchant_id
        HAVING count_if(decision <> 'approve') > 0
        ORDER BY flagged DESC, avg_score DESC, merchant_id
        LIMIT 10
    """,
    "fraud_rate_by_country_hourly": """
        -- Declined share by country and hour over the lake and the real-time table:
        -- real-time rows the lake already has (same partition, offset at or below the
        -- lake's last) are left out, so nothing is counted twice.
        WITH lake_head AS (
            SELECT kafka_partition, max(kafka_offset) AS last_offset
            FROM payments_scored GROUP BY kafka_partition
        ), all_payments AS (
            SELECT event_time, country, decision FROM payments_scored
            UNION ALL
            SELECT r.event_time, r.country, r.decision
            FROM payments_scored_rt r
            LEFT JOIN lake_head h ON r.kafka_partition = h.kafka_partition
            WHERE h.last_offset IS NULL OR r.kafka_offset > h.last_offset
        )
        SELECT date_trunc('hour', event_time) AS hour,
               country,
               count(*) AS payments,
               count_if(decision = 'decline') AS declined,
               round(count_if(decision = 'decline') / CAST(count(*) AS DOUBLE), 4)
                   AS fraud_rate
        FROM all_payments
        WHERE event_time >= current_timestamp - INTERVAL '1' DAY
        GROUP BY 1, 2
        ORDER BY hour DESC, fraud_rate DESC, country
    """,
    "card_timeline": """
        -- One card's recent payments in order, with the time since its previous one.
        SELECT event_time, payment_id, merchant_id, country, amount_eur, score, decision,
               reasons,
               date_diff('millisecond', lag(event_time) OVER (ORDER BY event_time),
                         event_time) / 1e3 AS seconds_since_previous
        FROM payments_scored_rt
        WHERE card_id = 'card-42'
        ORDER BY event_time
    """,
}
