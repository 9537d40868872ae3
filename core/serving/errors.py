"""Errors shared by servers and clients, and the one JSON shape every error response has."""

from __future__ import annotations

# Routes of the OpenAI API family, whose clients read errors in OpenAI's shape.
OPENAI_PREFIX = "/v1/"


def error_body(message: str, status: int, error_type: str | None = None, path: str = "") -> dict:
    """The error payload in the shape of the route's API family.

    OpenAI routes (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``, which the
    official client shows as the exception's message. Every other route: TEI's
    ``{"error": message, "error_type": kind, "code": status}`` (our own routes share it).

    >>> error_body("bad n", 400, path="/v1/completions")["error"]["message"]
    'bad n'
    >>> error_body("bad n", 400, path="/embed")
    {'error': 'bad n', 'error_type': 'validation', 'code': 400}
    """
    kind = error_type or _default_type(status)
    if path.startswith(OPENAI_PREFIX):
        return {"error": {"message": message, "type": kind, "param": None, "code": status}}
    return {"error": message, "error_type": kind, "code": status}


def error_message(body: dict) -> str:
    """The message of an error payload in either shape."""
    error = body.get("error")
    return error.get("message", "") if isinstance(error, dict) else str(error or "")


def _default_type(status: int) -> str:
    if status == 401:
        return "unauthorized"
    if status == 403:
        return "forbidden"
    if status == 404:
        return "not_found"
    if status == 413:
        return "payload_too_large"
    if status == 429:
        return "overloaded"
    if status == 503:
        return "unavailable"
    if status == 501:
        return "not_implemented"
    if 400 <= status < 500:
        return "validation"
    return "server"


class APIError(Exception):
    """Raised by route code to answer with ``status`` and the uniform error body."""

    def __init__(self, status: int, message: str, error_type: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type


class ServiceError(RuntimeError):
    """A remote service could not give an answer (unreachable, timed out, or answered an error).

    ``status`` is the HTTP status when the server answered, ``None`` when it could not be reached.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status
