"""`sluice deploy` without `--dry-run`: apply a written bundle with the cluster tools.

kubectl alone can apply everything (`kubectl apply -k overlays/<env>`); kn alone cannot
(it has no command for KafkaSources with delivery settings, KafkaSinks or KafkaTopics),
so kubectl is required and kn is never needed. Where kubectl is missing, the answer is a
message, not a half-applied deployment.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path


class ToolMissing(RuntimeError):
    """kubectl is not installed; the message says what to do instead."""


def overlay_command(out: Path, overlay: str) -> list[str]:
    return ["kubectl", "apply", "-k", str(out / "overlays" / overlay)]


def apply(out: Path, overlay: str, *, which: Callable[[str], str | None] = shutil.which,
          run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> int:
    """Apply `out/overlays/<overlay>`; returns kubectl's exit status."""
    if which("kubectl") is None:
        have_kn = which("kn") is not None
        raise ToolMissing(
            "kubectl is not installed" + (" (kn is, but kn cannot create KafkaSources with "
                                          "delivery settings)" if have_kn else
                                          " (nor is kn)")
            + f". The manifests are in {out}: apply them from a machine with kubectl "
            f"(`kubectl apply -k {out / 'overlays' / overlay}`, or `{out / 'kn.sh'}`), "
            "or run `sluice deploy --dry-run --out DIR` to only write them.")
    return run(overlay_command(out, overlay), check=False).returncode
