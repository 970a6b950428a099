"""The /infer body into an InferenceRequest: the one parser that every route uses.

HTTP bodies are validated strictly, as the OpenAPI document reads them: each JSON value must
have its schema's type, with no coercion ("1" is not 1, 0 is not false), and a number without
a fraction (1.0) is an integer, as JSON Schema says.
"""

import json
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError, model_validator

from ..errors import RequestError
from ..request import InferenceRequest, format_validation_error


def integral_as_int(value: Any) -> Any:
    """``value`` with each float without a fraction, at any depth, as an int."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, list):
        return [integral_as_int(item) for item in value]
    if isinstance(value, dict):
        return {key: integral_as_int(item) for key, item in value.items()}
    return value


JSON_VALUES = TypeAdapter(Any)


class StrictInferenceRequest(InferenceRequest):
    """InferenceRequest as HTTP takes it. BentoML validates /infer bodies with it before the
    API runs; parse_request validates every other body with it."""

    model_config = ConfigDict(strict=True, title="InferenceRequest")

    @model_validator(mode="before")
    @classmethod
    def _integral_numbers_are_integers(cls, data: Any) -> Any:
        return integral_as_int(data)


def parse_json(text: str | bytes, what: str) -> Any:
    """The JSON value of ``text``; a RequestError naming ``what`` (e.g. "the body") otherwise."""
    try:
        return json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        reason = error.msg if isinstance(error, json.JSONDecodeError) else "not UTF-8"
        raise RequestError(f"{what} is not JSON: {reason}") from None


def parse_request(body: Any) -> InferenceRequest:
    """The InferenceRequest of a body (decoded JSON, or the values BentoML validated); a
    RequestError listing each problem otherwise."""
    if not isinstance(body, dict):
        raise RequestError("the request must be a JSON object: the /infer body")
    try:
        return StrictInferenceRequest.model_validate(JSON_VALUES.dump_python(body, mode="json"))
    except ValidationError as error:
        raise RequestError(format_validation_error(error)) from None
