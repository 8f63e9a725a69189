"""Getting events in: the HTTP ingest gateway and the publisher client."""
