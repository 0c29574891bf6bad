"""SageMaker's error responses and the request checks that produce them."""

from __future__ import annotations

import re

NAME_PATTERN = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")


class ApiError(Exception):
    """An error SageMaker would return: code, message and HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def validation(message: str) -> ApiError:
    return ApiError("ValidationException", message)


def not_found(message: str = "Requested resource not found.") -> ApiError:
    # What AWS returns for Describe* of an unknown name, and what the Amazon provider's
    # operators test for when they ask whether a job or model exists.
    return validation(message)


def resource_not_found(message: str) -> ApiError:
    return ApiError("ResourceNotFound", message)


def check_name(value, field: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise validation(
            f"1 validation error detected: Value '{value}' at '{field}' failed to satisfy constraint: Member must "
            f"satisfy regular expression pattern: ^[a-zA-Z0-9](-*[a-zA-Z0-9]){{0,62}} and have length at most 63")
    return value


def require(request: dict, *paths: str) -> None:
    """Each dotted path must be present, as the service's model requires."""
    for path in paths:
        node = request
        for part in path.split("."):
            if not isinstance(node, dict) or part not in node or node[part] in (None, ""):
                raise validation(f"1 validation error detected: Value null at '{path[0].lower() + path[1:]}' "
                                 "failed to satisfy constraint: Member must not be null")
            node = node[part]
