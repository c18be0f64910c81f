"""OpenAI-style error objects: `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

from __future__ import annotations

from pydantic import ValidationError

# Types that pydantic adds to a location for the member of a union it tried (`str`, `list[int]`).
_UNION_TAG_CHARS = set("[]")
_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


class ApiError(Exception):
    """A request the server refuses; becomes a JSON error body with `status`."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_validation(e: ValidationError) -> ApiError:
    """The one most specific problem of a rejected body, named by its JSON path (`messages[0].role`)."""
    errors = e.errors(include_url=False)
    if errors[0]["type"] == "json_invalid":
        return ApiError(
            400,
            f"the request body is not valid JSON ({errors[0]['msg'].removeprefix('Invalid JSON: ')})",
            code="invalid_json",
        )
    # Within a union every member reports; the deepest, most specific report says the most.
    err = max(errors, key=lambda x: (len(x["loc"]), x["type"] not in ("missing", "extra_forbidden")))
    param = _json_path(err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "required field is missing"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param, code=err["type"])


def _json_path(loc: tuple) -> str | None:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in _UNION_TAGS or _UNION_TAG_CHARS & set(part):
            continue
        else:
            path += f".{part}" if path else part
    return path or None
