"""Every failure a client can see, as its API's error body, decided in this one place.

Routes and serving code raise; the handlers installed here translate. The body is
OpenAI's `{"error": {"message", "type", "param", "code"}}`, or on Anthropic's Messages
API (/v1/messages*) Anthropic's `{"type": "error", "error": {"type", "message"}}`, with
the same status either way; an invalid request is 400, never FastAPI's 422.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gptserve.engine.outputs import (AdapterError, AdapterNotFoundError, EngineDeadError, GrammarError,
                                     InvalidPromptError, PromptTooLongError, RequestFailedError)
from gptserve.engine.sampling_params import InvalidSamplingParams
from gptserve.server.anthropic.answers import AnthropicErrorResponse
from gptserve.server.protocol.base import INVALID, UNSUPPORTED, ErrorResponse

log = logging.getLogger(__name__)


class APIError(Exception):
    """An error with its HTTP status and OpenAI error type; subclasses fix both."""

    status_code = 500
    type = "internal_error"
    default_code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code or self.default_code


class InvalidRequestError(APIError):
    status_code = 400
    type = "invalid_request_error"


class UnsupportedParameterError(InvalidRequestError):
    default_code = "unsupported_parameter"


class ContextLengthExceededError(InvalidRequestError):
    default_code = "context_length_exceeded"


class AuthenticationError(APIError):
    status_code = 401
    type = "invalid_request_error"
    default_code = "invalid_api_key"


class NotFoundError(APIError):
    status_code = 404
    type = "invalid_request_error"


class ModelNotFoundError(NotFoundError):
    default_code = "model_not_found"

    def __init__(self, model: str, known: list[str] | None = None):
        served = f" This server serves: {', '.join(known)}." if known else ""
        super().__init__(f"The model `{model}` does not exist.{served}", param="model")


class RequestTooLargeError(APIError):
    status_code = 413
    type = "invalid_request_error"
    default_code = "request_too_large"


class QueueFullError(APIError):
    status_code = 429
    type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class EngineFailedError(APIError):
    """The engine failed this request (or died while serving it); carries the request id."""

    status_code = 500
    type = "internal_error"
    default_code = "engine_error"


class NotReadyError(APIError):
    status_code = 503
    type = "service_unavailable"
    default_code = "not_ready"

    def __init__(self, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # seconds, sent as Retry-After


class ClientDisconnected(APIError):
    """The client went away before its response was ready; nobody reads the answer."""

    status_code = 499
    type = "client_closed_request"

    def __init__(self) -> None:
        super().__init__("the client closed the connection")


# what each error status means, for the OpenAPI document
ERROR_STATUSES = {
    400: "Invalid request: a malformed body, a value out of range, a limit of this server, too long for the context",
    401: "Missing or wrong API key",
    404: "Unknown model or URL",
    413: "Request body larger than --max-body-bytes",
    429: "Too many requests in flight (--max-queued-requests)",
    500: "The engine failed this request; the message carries the request id",
    503: "Not ready, shutting down, or the model still loading (Retry-After)",
}


# Anthropic's error type for each status; 503 (not ready, shutting down) is its "overloaded"
ANTHROPIC_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                         404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
                         500: "api_error", 503: "overloaded_error"}
ANTHROPIC_PATH = "/v1/messages"


def speaks_anthropic(path: str) -> bool:
    """Whether the route at `path` is Anthropic's Messages API, whose errors are Anthropic's shape."""
    return path == ANTHROPIC_PATH or path.startswith(ANTHROPIC_PATH + "/")


def error_responses(*statuses: int, model: type[BaseModel] = ErrorResponse) -> dict[int | str, dict]:
    """OpenAPI `responses` entries for these error statuses, each with OpenAI's error body
    (or `model`: AnthropicErrorResponse on the Messages API)."""
    return {status: {"model": model, "description": ERROR_STATUSES[status]} for status in statuses}


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def anthropic_error_body(err: APIError) -> dict:
    """Anthropic's body has no param: the message names it, as Anthropic's do ("max_tokens: ...")."""
    kind = ANTHROPIC_ERROR_TYPES.get(err.status_code, "invalid_request_error" if err.status_code < 500 else "api_error")
    message = err.message if not err.param or err.param in err.message else f"{err.param}: {err.message}"
    return {"type": "error", "error": {"type": kind, "message": message}}


def error_response(err: APIError, headers: dict[str, str] | None = None, path: str = "") -> JSONResponse:
    """`err` as the body of the API at `path` (the request's URL path)."""
    body = anthropic_error_body(err) if speaks_anthropic(path) else error_body(err.message, err.type, err.param,
                                                                                   err.code)
    return JSONResponse(body, status_code=err.status_code, headers=headers)


def from_exception(exc: BaseException, request_id: str | None = None, prompt_param: str = "prompt",
                   grammar_param: str = "response_format") -> APIError:
    """The APIError a client sees for any exception raised while serving a request;
    `prompt_param` and `grammar_param` are the fields that carried the prompt (chat's is
    "messages") and the output constraint."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, GrammarError):
        return InvalidRequestError(str(exc), param=grammar_param)
    if isinstance(exc, AdapterNotFoundError):
        return ModelNotFoundError(exc.name)
    if isinstance(exc, AdapterError):
        return InvalidRequestError(str(exc))
    if isinstance(exc, InvalidSamplingParams):
        return InvalidRequestError(str(exc), param=exc.param)
    if isinstance(exc, InvalidPromptError):
        return InvalidRequestError(str(exc), param=prompt_param)
    if isinstance(exc, PromptTooLongError):
        return ContextLengthExceededError(str(exc), param=prompt_param)  # names the limit
    if isinstance(exc, RequestFailedError):
        return EngineFailedError(f"{exc}")
    if isinstance(exc, EngineDeadError):
        return EngineFailedError(f"request {request_id} failed: the engine has stopped ({exc})")
    log.error("request %s failed", request_id, exc_info=exc)
    return APIError(f"request {request_id} failed: internal server error ({type(exc).__name__})")


# pydantic names union members in error locations: ('stop', 'list[str]', 0); they are not fields
_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def param_from_loc(loc: tuple) -> str | None:
    """pydantic's error location as OpenAI's param: ('body', 'messages', 0, 'role') -> messages[0].role."""
    param = ""
    for part in loc[1:] if loc[:1] == ("body",) else loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in part or "(" in part:
            continue
        else:
            param += f".{part}" if param else part
    return param or None


def validation_error(exc: RequestValidationError) -> InvalidRequestError:
    """The first of pydantic's complaints, worded for a person."""
    err = exc.errors()[0]
    kind, msg, ctx = err.get("type", ""), err.get("msg", "invalid value"), err.get("ctx") or {}
    param = ctx.get("param") or param_from_loc(tuple(err.get("loc", ())))
    if kind == UNSUPPORTED:
        return UnsupportedParameterError(msg, param=param)
    if kind == INVALID:
        return InvalidRequestError(msg, param=param)
    if kind == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {ctx.get('error', msg)}")
    if param is None:
        return InvalidRequestError(
            f"The request body must be a JSON object (Content-Type: application/json): {msg}")
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param)
    return InvalidRequestError(f"Invalid value for '{param}': {msg}", param=param)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route answers on this request's path."""
    scope = {**request.scope, "method": "GET"}
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches(scope)[0] != Match.NONE:
            methods |= getattr(route, "methods", None) or set()
    return sorted(methods)


def install_error_handlers(app: FastAPI) -> None:
    async def on_exception(request: Request, exc: Exception) -> JSONResponse:
        err = from_exception(exc)
        retry_after = getattr(err, "retry_after", None)
        headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
        return error_response(err, headers=headers, path=request.url.path)

    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(exc), path=request.url.path)

    async def on_http_exception(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = NotFoundError(f"Invalid URL ({request.method} {request.url.path})", code="unknown_url")
        elif exc.status_code == 413:
            err = RequestTooLargeError(str(exc.detail))
        else:
            err = InvalidRequestError(str(exc.detail))
            err.status_code = exc.status_code
        headers = getattr(exc, "headers", None)
        if exc.status_code == 405:  # Starlette names only the first route on the path
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request))}
        return error_response(err, headers=headers, path=request.url.path)

    # known kinds get their own entry, or Starlette would also log them as unhandled 500s
    for kind in (APIError, InvalidSamplingParams, InvalidPromptError, PromptTooLongError, GrammarError,
                 AdapterError, AdapterNotFoundError, RequestFailedError, EngineDeadError, Exception):
        app.add_exception_handler(kind, on_exception)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    document_validation_errors(app)


def document_validation_errors(app: FastAPI) -> None:
    """The OpenAPI document says what the handlers above do: where FastAPI would promise a
    422 (an operation with a body or parameters) it is a 400 in its API's error shape, and
    a body can be refused with 413."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            for path, operation in ((p, op) for p, ops in schema["paths"].items() for op in ops.values()):
                name = "AnthropicErrorResponse" if speaks_anthropic(path) else "ErrorResponse"
                error_schema = {"$ref": f"#/components/schemas/{name}"}
                responses = operation["responses"]
                if responses.pop("422", None) is None:
                    continue
                statuses = (400, 413) if "requestBody" in operation else (400,)
                for status in statuses:
                    responses.setdefault(str(status), {"description": ERROR_STATUSES[status],
                                                       "content": {"application/json": {"schema": error_schema}}})
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for model in (ErrorResponse, AnthropicErrorResponse):
                if model.__name__ not in components:
                    error = model.model_json_schema(ref_template="#/components/schemas/{model}")
                    components.update(error.pop("$defs", {}), **{model.__name__: error})
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
