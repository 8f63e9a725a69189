"""Tables fed from topics: lake and real-time sinks, the real-time server, SQL."""
