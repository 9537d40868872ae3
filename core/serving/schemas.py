"""What every service's OpenAPI document declares beyond its own routes: the error bodies (in
the shape of each route's API family) on every operation, ``/metrics`` as Prometheus text, and
the ``/health`` body. A schema-driven client or fuzzer can then check every answer it gets."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

from core.serving.errors import OPENAI_PREFIX

# Statuses any route may answer besides its own: bad body (400/422), key (401), engine refusals
# (403/404/501), body over the limit (413), overload (429/503), and the last resort (500).
ERROR_STATUSES = ("400", "401", "403", "404", "413", "422", "429", "500", "501", "503")


class Health(BaseModel):
    """``GET /health``: ``status`` and what the service adds (model, device, workers, ...)."""

    model_config = ConfigDict(extra="allow")
    status: str


class ModelCard(BaseModel):
    """One served model in OpenAI's ``GET /v1/models``."""

    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int | None = None


class ModelList(BaseModel):
    """OpenAI's ``GET /v1/models``."""

    object: Literal["list"]
    data: list[ModelCard]


def _error_schemas() -> dict:
    tei = {
        "type": "object",
        "required": ["error", "error_type", "code"],
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}, "code": {"type": "integer"}},
    }
    openai = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["message", "type", "code"],
                "properties": {
                    "message": {"type": "string"},
                    "type": {"type": "string"},
                    "param": {"type": ["string", "null"]},
                    "code": {"type": ["integer", "string", "null"]},
                },
            }
        },
    }
    return {"ErrorResponse": tei, "OpenAIErrorResponse": openai}


def declare_errors(spec: dict) -> dict:
    """Add the error responses to every operation of an OpenAPI document (in place), replacing
    FastAPI's default 422 body, which our servers never send."""
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas.update(_error_schemas())
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, operations in spec.get("paths", {}).items():
        ref = "#/components/schemas/" + ("OpenAIErrorResponse" if path.startswith(OPENAI_PREFIX) else "ErrorResponse")
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            for status in ERROR_STATUSES:
                responses[status] = {
                    "description": "error",
                    "content": {"application/json": {"schema": {"$ref": ref}}},
                }
    return spec
