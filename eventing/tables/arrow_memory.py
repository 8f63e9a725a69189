"""Which allocator Arrow uses in the long-running lake sink, chosen before pyarrow loads.

Why: pyarrow's default pool here is mimalloc, and in the lake sink it kept what Arrow
freed. Measured on the example stack (20 payments/s, load ~12-17): the mimalloc region
(one 1 GiB reservation in /proc/PID/smaps) grew 48 -> 107 MiB in 12 minutes, about
+5 MiB/min, while Arrow's live bytes (`pyarrow.total_allocated_bytes()`) were ~0-6 MiB
between batches, tracemalloc's Python heap stayed at ~4-5 MiB and glibc's heap was flat.
Many threads allocate (pyiceberg's writer pool, the S3 client, compaction) and mimalloc's
per-thread pages are not handed back. The system allocator returns large frees to the
OS (see README "Not yet bounded" for the before/after slopes).

The C++ default pool is picked once, from `ARROW_DEFAULT_MEMORY_POOL`, at its first use,
so this must run before anything allocates with Arrow; an operator's own choice in that
variable wins.
"""

from __future__ import annotations

import os
import sys
from collections.abc import MutableMapping

POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"
LAKE_SINK_POOL = "system"


def use_returning_pool(env: MutableMapping[str, str] | None = None) -> str:
    """Make Arrow's default pool `LAKE_SINK_POOL` unless the environment names one.

    Returns the pool name asked for. Also sets pyarrow's Python-level default when
    pyarrow is already imported (then C++ code that takes the global default may still
    use the old pool: call this first).
    """
    env = os.environ if env is None else env
    name = env.setdefault(POOL_ENV, LAKE_SINK_POOL)
    if "pyarrow" in sys.modules and name == "system":
        import pyarrow as pa

        pa.set_memory_pool(pa.system_memory_pool())
    return name
