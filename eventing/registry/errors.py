"""Registry errors carrying Confluent's error codes.

Clients such as `confluent_kafka.schema_registry` branch on `error_code` (e.g. 40401 vs
40403), so every failure the registry can report is raised as a `RegistryError` with the
exact code and HTTP status Confluent uses; the HTTP layer only serialises it.
"""

from __future__ import annotations


class RegistryError(Exception):
    """A failure with a Confluent `error_code` and the HTTP status it is served with."""

    def __init__(self, status: int, error_code: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message


def subject_not_found(subject: str) -> RegistryError:
    return RegistryError(404, 40401, f"Subject '{subject}' not found.")


def version_not_found(subject: str, version: object) -> RegistryError:
    return RegistryError(404, 40402, f"Version {version} not found for subject '{subject}'.")


def schema_not_found(detail: str = "Schema not found") -> RegistryError:
    return RegistryError(404, 40403, detail)


def subject_soft_deleted(subject: str) -> RegistryError:
    return RegistryError(
        404, 40404,
        f"Subject '{subject}' was soft deleted. Set permanent=true to delete permanently",
    )


def subject_not_soft_deleted(subject: str) -> RegistryError:
    return RegistryError(
        404, 40405,
        f"Subject '{subject}' was not deleted first before being permanently deleted",
    )


def version_soft_deleted(subject: str, version: int) -> RegistryError:
    return RegistryError(
        404, 40406,
        f"Subject '{subject}' Version {version} was soft deleted. "
        "Set permanent=true to delete permanently",
    )


def version_not_soft_deleted(subject: str, version: int) -> RegistryError:
    return RegistryError(
        404, 40407,
        f"Subject '{subject}' Version {version} was not deleted first before being "
        "permanently deleted",
    )


def subject_config_not_found(subject: str) -> RegistryError:
    return RegistryError(
        404, 40408, f"Subject '{subject}' does not have subject-level compatibility configured"
    )


def incompatible(message: str) -> RegistryError:
    return RegistryError(409, 409, message)


def invalid_schema(reason: str) -> RegistryError:
    return RegistryError(422, 42201, f"Invalid schema: {reason}")


def invalid_version(version: object) -> RegistryError:
    return RegistryError(
        422, 42202,
        f"The specified version '{version}' is not a valid version id. Allowed values are "
        'between [1, 2^31-1] and the string "latest"',
    )


def invalid_compatibility(level: object) -> RegistryError:
    return RegistryError(
        422, 42203,
        f"Invalid compatibility level {level!r}. Valid values are NONE, BACKWARD, "
        "BACKWARD_TRANSITIVE, FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE",
    )


def invalid_mode(mode: object) -> RegistryError:
    return RegistryError(422, 42204, f"Invalid mode {mode!r}: only READWRITE is supported")


def referenced(subject: str, version: int) -> RegistryError:
    return RegistryError(
        422, 42206,
        f"One or more references exist to the schema {{subject={subject}, version={version}}}",
    )


def store_error(reason: str) -> RegistryError:
    return RegistryError(500, 50001, f"Error in the backend data store: {reason}")


def store_timeout(reason: str) -> RegistryError:
    return RegistryError(500, 50002, f"Operation timed out: {reason}")
