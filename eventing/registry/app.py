"""Confluent Schema Registry REST API over a `SchemaStore` (Starlette).

Only HTTP lives here: routes, query parameters, body parsing and the Confluent response and
error shapes (`{"error_code": N, "message": ...}`, media type
`application/vnd.schemaregistry.v1+json`). The rules are in `store` and `compat`, so the same
behaviour is tested through `starlette.testclient.TestClient` with a `MemoryLog`.

Store calls run in the thread pool: a write waits for the broker's acknowledgement and must
not stall the event loop.

Bounds: a request body over `MAX_BODY_BYTES` is answered 413 (a schema is stored as one
record of the `_schemas` topic, which the broker caps near 1 MB), and a body or schema
nested deeper than Python's parsers recurse is an invalid schema (422, 42201), not a 500.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import unquote

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import errors
from .errors import RegistryError
from .store import SchemaInfo, SchemaStore, SchemaVersion

MEDIA_TYPE = "application/vnd.schemaregistry.v1+json"
ACCEPTED_BODY_TYPES = frozenset({
    "application/vnd.schemaregistry.v1+json", "application/vnd.schemaregistry+json",
    "application/json", "application/octet-stream",
})
MAX_BODY_BYTES = 900_000  # below the broker's 1,000,000-byte record, envelope included
# Stands for "/" inside one path segment (a subject sent as `a%2Fb`) while routing.
_SLASH = "\ue000"

T = TypeVar("T")


class RegistryResponse(Response):
    media_type = MEDIA_TYPE

    def render(self, content: Any) -> bytes:
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()


def create_app(store: SchemaStore) -> ASGIApp:
    """The registry ASGI app serving `store`."""

    async def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        try:
            return await run_in_threadpool(fn, *args, **kwargs)
        except RecursionError:
            raise errors.invalid_schema("nested too deeply to parse") from None

    async def root(_: Request) -> Response:
        return RegistryResponse({})

    # ---- schemas ---------------------------------------------------------------------

    async def schema_types(_: Request) -> Response:
        return RegistryResponse(["AVRO"])

    async def list_schemas(request: Request) -> Response:
        found = await call(
            store.all_schemas, request.query_params.get("subjectPrefix", ""),
            _flag(request, "deleted"), _flag(request, "latestOnly"),
        )
        return RegistryResponse(_page(request, [_version_body(sv) for sv in found]))

    async def schema_by_id(request: Request) -> Response:
        info = await call(store.schema_by_id, request.path_params["id"])
        return RegistryResponse(_info_body(info))

    async def raw_schema_by_id(request: Request) -> Response:
        info = await call(store.schema_by_id, request.path_params["id"])
        return _raw(info.schema)

    async def schema_by_guid(request: Request) -> Response:
        info = await call(store.schema_by_guid, request.path_params["guid"])
        return RegistryResponse({**_info_body(info), "id": info.id})

    async def subjects_of_id(request: Request) -> Response:
        found = await call(
            store.versions_of_id, request.path_params["id"], _flag(request, "deleted"),
            request.query_params.get("subject"),
        )
        return RegistryResponse(_page(request, sorted({sv.subject for sv in found})))

    async def versions_of_id(request: Request) -> Response:
        found = await call(
            store.versions_of_id, request.path_params["id"], _flag(request, "deleted"),
            request.query_params.get("subject"),
        )
        return RegistryResponse(
            _page(request, [{"subject": sv.subject, "version": sv.version} for sv in found])
        )

    # ---- subjects --------------------------------------------------------------------

    async def list_subjects(request: Request) -> Response:
        found = await call(
            store.subjects, request.query_params.get("subjectPrefix", ""),
            _flag(request, "deleted"), _flag(request, "deleted_only"),
        )
        return RegistryResponse(_page(request, found))

    async def lookup(request: Request) -> Response:
        body = await _body(request)
        sv = await call(
            store.lookup, _subject(request), body.get("schema"), body.get("references"),
            body.get("schemaType"), _flag(request, "normalize"),
            _flag(request, "deleted") or _flag(request, "lookupDeletedSchema"),
        )
        return RegistryResponse(_version_body(sv))

    async def delete_subject(request: Request) -> Response:
        deleted = await call(store.delete_subject, _subject(request), _flag(request, "permanent"))
        return RegistryResponse(deleted)

    async def list_versions(request: Request) -> Response:
        found = await call(
            store.versions, _subject(request), _flag(request, "deleted"),
            _flag(request, "deleted_only"),
        )
        return RegistryResponse(_page(request, found))

    async def register(request: Request) -> Response:
        body = await _body(request)
        _refuse_unsupported(body)
        sv = await call(
            store.register, _subject(request), body.get("schema"), body.get("references"),
            body.get("schemaType"), _flag(request, "normalize"),
        )
        return RegistryResponse({"id": sv.id, "version": sv.version, "guid": sv.guid})

    async def get_version(request: Request) -> Response:
        sv = await call(
            store.get_version, _subject(request), request.path_params["version"],
            _flag(request, "deleted"),
        )
        return RegistryResponse(_version_body(sv))

    async def raw_version(request: Request) -> Response:
        sv = await call(
            store.get_version, _subject(request), request.path_params["version"],
            _flag(request, "deleted"),
        )
        return _raw(sv.schema)

    async def referenced_by(request: Request) -> Response:
        ids = await call(store.referenced_by, _subject(request), request.path_params["version"])
        return RegistryResponse(_page(request, ids))

    async def delete_version(request: Request) -> Response:
        version = await call(
            store.delete_version, _subject(request), request.path_params["version"],
            _flag(request, "permanent"),
        )
        return RegistryResponse(version)

    # ---- config, compatibility, mode -------------------------------------------------

    async def get_config(request: Request) -> Response:
        subject = _subject(request) if "subject" in request.path_params else None
        level = await call(store.get_config, subject, _flag(request, "defaultToGlobal"))
        return RegistryResponse({"compatibilityLevel": level})

    async def put_config(request: Request) -> Response:
        body = await _body(request)
        subject = _subject(request) if "subject" in request.path_params else None
        level = body.get("compatibility", body.get("compatibilityLevel"))
        level = await call(store.set_config, subject, level)
        return RegistryResponse({"compatibility": level})

    async def delete_config(request: Request) -> Response:
        subject = _subject(request) if "subject" in request.path_params else None
        previous = await call(store.delete_config, subject)
        return RegistryResponse({"compatibilityLevel": previous})

    async def compatibility(request: Request) -> Response:
        body = await _body(request)
        messages = await call(
            store.test_compatibility, _subject(request), request.path_params.get("version"),
            body.get("schema"), body.get("references"), body.get("schemaType"),
        )
        reply: dict[str, Any] = {"is_compatible": not messages}
        if _flag(request, "verbose"):
            reply["messages"] = messages
        return RegistryResponse(reply)

    async def get_mode(_: Request) -> Response:
        return RegistryResponse({"mode": "READWRITE"})

    async def put_mode(request: Request) -> Response:
        body = await _body(request)
        if str(body.get("mode", "")).upper() != "READWRITE":
            raise errors.invalid_mode(body.get("mode"))
        return RegistryResponse({"mode": "READWRITE"})

    async def contexts(_: Request) -> Response:
        return RegistryResponse(["."])

    async def metrics(_: Request) -> Response:
        # Plain text exposition, written by hand: two gauges need no client registry.
        text = (
            "# HELP sluice_registry_subjects Live subjects in the registry\n"
            "# TYPE sluice_registry_subjects gauge\n"
            f"sluice_registry_subjects {len(store.subjects())}\n"
            "# HELP sluice_registry_schemas Live schema versions in the registry\n"
            "# TYPE sluice_registry_schemas gauge\n"
            f"sluice_registry_schemas {len(store.all_schemas())}\n"
        )
        return Response(text, media_type="text/plain; version=0.0.4")

    subject = "/subjects/{subject}"
    version = subject + "/versions/{version}"
    routes = [
        Route("/", root, methods=["GET"]),
        Route("/schemas", list_schemas, methods=["GET"]),
        Route("/schemas/types", schema_types, methods=["GET"]),
        Route("/schemas/ids/{id:int}", schema_by_id, methods=["GET"]),
        Route("/schemas/ids/{id:int}/schema", raw_schema_by_id, methods=["GET"]),
        Route("/schemas/ids/{id:int}/subjects", subjects_of_id, methods=["GET"]),
        Route("/schemas/ids/{id:int}/versions", versions_of_id, methods=["GET"]),
        Route("/schemas/guids/{guid}", schema_by_guid, methods=["GET"]),
        Route("/subjects", list_subjects, methods=["GET"]),
        Route(subject, lookup, methods=["POST"]),
        Route(subject, delete_subject, methods=["DELETE"]),
        Route(subject + "/versions", list_versions, methods=["GET"]),
        Route(subject + "/versions", register, methods=["POST"]),
        Route(version, get_version, methods=["GET"]),
        Route(version, delete_version, methods=["DELETE"]),
        Route(version + "/schema", raw_version, methods=["GET"]),
        Route(version + "/referencedby", referenced_by, methods=["GET"]),
        Route("/config", get_config, methods=["GET"]),
        Route("/config", put_config, methods=["PUT"]),
        Route("/config", delete_config, methods=["DELETE"]),
        Route("/config/{subject}", get_config, methods=["GET"]),
        Route("/config/{subject}", put_config, methods=["PUT"]),
        Route("/config/{subject}", delete_config, methods=["DELETE"]),
        Route("/compatibility" + version, compatibility, methods=["POST"]),
        Route("/compatibility" + subject + "/versions", compatibility, methods=["POST"]),
        Route("/mode", get_mode, methods=["GET"]),
        Route("/mode", put_mode, methods=["PUT"]),
        Route("/mode/{subject}", get_mode, methods=["GET", "DELETE"]),
        Route("/mode/{subject}", put_mode, methods=["PUT"]),
        Route("/contexts", contexts, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            RegistryError: _registry_error,
            HTTPException: _http_error,
            Exception: _internal_error,
        },
    )
    return _EncodedSlashes(app)


class _EncodedSlashes:
    """Keep `%2F` inside a subject name from splitting the route (ASGI decodes the path)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = scope.get("raw_path") if scope["type"] == "http" else None
        if raw and b"%2f" in raw.lower():
            segments = raw.decode("latin-1").split("/")
            path = "/".join(unquote(s).replace("/", _SLASH) for s in segments)
            scope = {**scope, "path": path}
        await self.app(scope, receive, send)


def _subject(request: Request) -> str:
    return str(request.path_params["subject"]).replace(_SLASH, "/")


def _flag(request: Request, name: str) -> bool:
    """Booleans arrive as `true`, and from the Python client also as `True`/`False`."""
    return request.query_params.get(name, "false").strip().lower() in ("true", "1")


def _page(request: Request, items: list[Any]) -> list[Any]:
    try:
        offset = max(int(request.query_params.get("offset", 0)), 0)
        limit = int(request.query_params.get("limit", -1))
    except ValueError as exc:
        raise RegistryError(400, 400, f"invalid offset/limit: {exc}") from exc
    items = items[offset:]
    return items if limit < 0 else items[:limit]


async def _body(request: Request) -> dict[str, Any]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype and ctype not in ACCEPTED_BODY_TYPES:
        raise RegistryError(415, 415, f"HTTP 415 Unsupported Media Type: {ctype}")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise _too_large()
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    raw = b"".join(chunks)
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except RecursionError:
        raise errors.invalid_schema("request body nested too deeply to parse") from None
    except ValueError as exc:
        raise RegistryError(400, 400, f"Unexpected character in request body: {exc}") from exc
    if not isinstance(body, dict):
        raise RegistryError(422, 422, "request body must be a JSON object")
    return body


def _too_large() -> RegistryError:
    return RegistryError(413, 413, f"request body over {MAX_BODY_BYTES} bytes: a schema is "
                         "stored as one Kafka record; split it with schema references")


def _refuse_unsupported(body: dict[str, Any]) -> None:
    """Data contracts would be silently ignored here: refuse them rather than pretend."""
    for key in ("metadata", "ruleSet"):
        if body.get(key):
            raise errors.invalid_schema(f"'{key}' is not supported by this registry")


def _version_body(sv: SchemaVersion) -> dict[str, Any]:
    body: dict[str, Any] = {
        "subject": sv.subject, "version": sv.version, "id": sv.id, "guid": sv.guid,
        "schema": sv.schema,
    }
    if sv.references:
        body["references"] = [r.to_json() for r in sv.references]
    return body


def _info_body(info: SchemaInfo) -> dict[str, Any]:
    body: dict[str, Any] = {"schema": info.schema, "guid": info.guid}
    if info.references:
        body["references"] = [r.to_json() for r in info.references]
    return body


def _raw(schema: str) -> Response:
    return Response(schema, media_type=MEDIA_TYPE)


async def _registry_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RegistryError)
    return RegistryResponse({"error_code": exc.error_code, "message": exc.message},
                            status_code=exc.status)


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return RegistryResponse(
        {"error_code": exc.status_code, "message": f"HTTP {exc.status_code} {exc.detail}"},
        status_code=exc.status_code,
    )


async def _internal_error(_: Request, exc: Exception) -> Response:
    return RegistryResponse({"error_code": 50001, "message": f"Internal error: {exc}"},
                            status_code=500)
