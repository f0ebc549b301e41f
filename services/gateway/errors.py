"""Errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}}, with the right status."""

from __future__ import annotations

from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
          408: "timeout_error", 429: "rate_limit_error", 499: "client_closed_request", 500: "server_error",
          502: "server_error", 503: "service_unavailable", 504: "timeout_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def retry_later(status: int, message: str, retry_after_s: int, code: str | None = None) -> APIError:
    """A 429 or 503 that tells the client when to try again (every overload and outage answer has one)."""
    return APIError(status, message, code=code, headers={"Retry-After": str(retry_after_s)})


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error"), "param": param,
                      "code": code}}


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, APIError)
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def validation_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Pydantic's 422 becomes OpenAI's 400, naming the first offending field."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # Union members add their type name to the location (prompt.str, prompt.list[int]): drop them.
    param = ".".join(part for part in loc if not any(c in part for c in "[]") and part not in ("str", "int"))
    message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(400, "request body is not valid JSON", None, "invalid_json"), 400)
    if first.get("type") == "missing":
        message = f"'{param}' is required"
    return JSONResponse(error_body(400, f"{param}: {message}" if param else message, param or None,
                                   "invalid_parameter"), status_code=400)


async def http_error_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))
