"""Small probes shared by the parts' health checks."""

from __future__ import annotations

import httpx


def http_status(url: str, *, method: str = "GET", timeout: float = 1.0, **kwargs) -> int | None:
    """HTTP status of `url`, or None when nothing answers."""
    try:
        return httpx.request(method, url, timeout=timeout, **kwargs).status_code
    except httpx.HTTPError:
        return None
