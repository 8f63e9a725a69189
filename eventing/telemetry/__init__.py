"""Seeing the pipeline: tracing, the trace store, metrics, dashboards, top."""
