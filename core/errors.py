"""Errors shared by servers and clients, and the one JSON shape every error response has."""

from __future__ import annotations


def error_body(message: str, status: int, error_type: str | None = None, **extra) -> dict:
    """The uniform error payload: ``{"error": message, "error_type": kind, "code": status}``.

    ``error`` + ``error_type`` is the shape TEI answers with; the OpenAI client reads ``error``
    as the message, so one shape serves both families of clients.
    """
    return {"error": message, "error_type": error_type or _default_type(status), "code": status, **extra}


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
