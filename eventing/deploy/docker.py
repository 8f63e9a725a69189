"""One container build context per function: Dockerfile, entry file, code, requirements.

The image carries only what the function's host needs: the Sluice modules that
`eventing.fn.host` imports (found by reading their imports, so the list follows the code),
the function's folder, and the pinned third-party packages those import. The entry
point is exactly the one `eventing.fn.env` documents, with the env-reading entry file
written by `eventing.fn.env.write_entry_file(None, ...)`:

    functions-framework --source entry.py --target handle --signature-type http \\
        --host "$SLUICE_LISTEN_HOST" --port "$PORT"

`PORT` is set by Knative; `SLUICE_LISTEN_HOST` defaults to 0.0.0.0 in the image (a pod
must listen on its own address) and is 127.0.0.1 when the same command runs locally.
Paths are relative to the image's WORKDIR, so the command and the Service's `env` run
unchanged both in the image (WORKDIR /app) and in the build context folder.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shlex
import shutil
import sys
import tomllib
from pathlib import Path

from eventing.deploy.common import DeployError, header
from eventing.fn import env as host_env
from eventing.topology import Function

BASE_IMAGE = "python:3.11-slim"
WORKDIR = "/app"
ENTRY_FILE = "entry.py"
FUNCTION_DIR = "function"
FUNCTION_SOURCE = f"{FUNCTION_DIR}/main.py"
LISTEN_HOST_VAR = "SLUICE_LISTEN_HOST"
PORT_VAR = "PORT"  # set by Knative in every revision's container
RUN_AS_UID = 10001
PACKAGE_DIR = Path(host_env.__file__).resolve().parents[1]  # the `eventing` package
PROJECT_DIR = PACKAGE_DIR.parent
# Not imported by the host, but it is the server that runs it.
ALWAYS = ("functions-framework",)
_IGNORED = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache", "*.egg-info")


def serve_argv() -> list[str]:
    """host_env.serve_command with the image's entry file and shell-expanded host and port."""
    return host_env.serve_command(ENTRY_FILE, f"${PORT_VAR}",  # type: ignore[arg-type]
                              host=f"${LISTEN_HOST_VAR}")


def serve_shell() -> str:
    """The CMD text: `exec` so the server is PID 1 and receives SIGTERM from Kubernetes."""
    words = [f'"{w}"' if w.startswith("$") else shlex.quote(w) for w in serve_argv()]
    return "exec " + " ".join(words)


# --------------------------------------------------------------------------- imports


def _imports(path: Path) -> set[str]:
    """Every module name imported anywhere in `path` (also inside functions: lazy imports
    are still needed at run time)."""
    tree = ast.parse(path.read_text(), str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def runtime_modules(root: str = "eventing.fn.host") -> list[Path]:
    """The Sluice source files the host needs: `root` and what it imports, transitively."""
    seen: dict[str, Path] = {}
    todo = [root]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        rel = Path(*name.split("."))
        for candidate in (PROJECT_DIR / rel.with_suffix(".py"), PROJECT_DIR / rel / "__init__.py"):
            if candidate.is_file():
                break
        else:
            continue  # `from eventing.x import Name`: Name is not a module
        seen[name] = candidate
        parts = name.split(".")
        for i in range(1, len(parts)):  # parent packages' __init__ run on import
            todo.append(".".join(parts[:i]))
        todo.extend(m for m in _imports(candidate) if m.split(".")[0] == "eventing")
    return sorted(set(seen.values()))


def third_party(files: list[Path], local: set[str]) -> set[str]:
    """Top-level names of non-stdlib, non-local modules that `files` import."""
    out = set()
    for f in files:
        for name in _imports(f):
            top = name.split(".")[0]
            if top not in sys.stdlib_module_names and top not in local:
                out.add(top)
    return out


def _norm(dist: str) -> str:
    return re.sub(r"[-_.]+", "-", dist).lower()


def pinned_requirements() -> dict[str, str]:
    """Normalised distribution name -> requirement line, from pyproject.toml's pins."""
    data = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    out = {}
    for line in data["project"]["dependencies"]:
        name = re.split(r"[\[=<>!~ ;]", line, maxsplit=1)[0]
        out[_norm(name)] = line
    return out


def requirements(function: Function, runtime: list[Path]) -> list[str]:
    """Pinned requirement lines for the runtime plus the function (its own
    `requirements.txt` lines come last, verbatim)."""
    fn_dir = function.source.parent
    fn_files = function_files(function)
    local = {"eventing"} | {p.stem for p in fn_files} | {p.name for p in fn_dir.iterdir()
                                                        if p.is_dir()}
    pins = pinned_requirements()
    owners = importlib.metadata.packages_distributions()
    lines: set[str] = {pins[_norm(d)] for d in ALWAYS}
    extra = fn_dir / "requirements.txt"
    own = [ln.strip() for ln in extra.read_text().splitlines()
           if ln.strip() and not ln.lstrip().startswith("#")] if extra.exists() else []
    own_names = {_norm(re.split(r"[\[=<>!~ ;]", ln, maxsplit=1)[0]) for ln in own}
    for module in sorted(third_party(runtime + fn_files, local)):
        dists = owners.get(module, [])
        found = [pins[_norm(d)] for d in dists if _norm(d) in pins]
        if found:
            lines.update(found)  # a namespace package (opentelemetry): every pinned part
        elif not any(_norm(d) in own_names for d in dists) and _norm(module) not in own_names:
            raise DeployError(
                f"function {function.name!r}: module {module!r} is imported but neither pinned "
                f"in pyproject.toml nor listed in {extra}; add it there (pinned)")
    return sorted(lines, key=str.lower) + own


# --------------------------------------------------------------------------- files


def function_files(function: Function) -> list[Path]:
    """The function's code: its folder when the source is `<folder>/main.py`, else the file."""
    if function.source.name != "main.py":
        return [function.source]
    return sorted(p for p in function.source.parent.rglob("*.py") if "__pycache__" not in p.parts)


def dockerfile(function: Function, source: str) -> str:
    build = f"docker build -t <registry>/sluice-fn-{function.name}:<tag> ."
    return header(source) + f"""# Build: {build}
FROM {BASE_IMAGE}

ENV PYTHONUNBUFFERED=1 \\
    PIP_NO_CACHE_DIR=1 \\
    PIP_DISABLE_PIP_VERSION_CHECK=1 \\
    {PORT_VAR}=8080 \\
    {LISTEN_HOST_VAR}=0.0.0.0
WORKDIR {WORKDIR}

# Dependencies first: the layer is reused until the pins change.
COPY requirements.txt ./
RUN pip install --no-compile -r requirements.txt \\
 && useradd --system --uid {RUN_AS_UID} --no-create-home --shell /usr/sbin/nologin sluice

# The Sluice runtime (only the modules the host imports), the function, the entry file.
COPY eventing/ ./eventing/
COPY {FUNCTION_DIR}/ ./{FUNCTION_DIR}/
COPY {ENTRY_FILE} ./

USER {RUN_AS_UID}
EXPOSE 8080
CMD {serve_shell()}
"""


def write_context(function: Function, dest: Path, source: str, *,
                  include_code: bool = True) -> Path:
    """Write the build context of `function` into `dest` (replacing what was there).

    `include_code=False` writes only the generated files (Dockerfile, entry file,
    requirements): what is checked in under infra/cluster, where copies of the code
    would go stale. `sluice deploy --dry-run --out DIR` assembles complete contexts.
    """
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    runtime = runtime_modules()
    if include_code:
        for path in runtime:
            target = dest / path.relative_to(PROJECT_DIR)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        if function.source.name == "main.py":
            shutil.copytree(function.source.parent, dest / FUNCTION_DIR, ignore=_IGNORED)
        else:  # a single-file source: the image calls it main.py
            (dest / FUNCTION_DIR).mkdir()
            shutil.copyfile(function.source, dest / FUNCTION_SOURCE)
    host_env.write_entry_file(None, dest / ENTRY_FILE)
    (dest / "requirements.txt").write_text(
        f"# Generated by `sluice deploy` from {source}: the host runtime and "
        f"{function.name}'s imports.\n" + "\n".join(requirements(function, runtime)) + "\n")
    (dest / "Dockerfile").write_text(dockerfile(function, source))
    (dest / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\n")
    return dest
