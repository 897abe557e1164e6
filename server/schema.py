"""The request body (strictly typed) and the JSON error every non-200 answer carries."""

from __future__ import annotations

import json
from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from sd3trt.errors import Sd3trtError
from sd3trt.runtime import images as imgs
from sd3trt.runtime.pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS

MAX_SEED = 2**63 - 1


class Img2ImgRequest(BaseModel):
    """The hosted API's fields and defaults, plus seed, num_inference_steps and guidance_scale.

    Strict: numbers must be JSON numbers (an integer field takes no 10.0), booleans JSON booleans, and
    nothing is converted from a string ("0.5", "10", "true" are refused).
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    mode: Literal["image-to-image"] = Field("image-to-image", description="the only mode of this endpoint")
    image: str = Field(..., min_length=1, description="base64 of a PNG/JPEG/WEBP file, or an http(s) URL")
    prompt: str = Field(..., description="what to render")
    negative_prompt: str = Field("", description="what to steer away from")
    strength: float = Field(1.0, ge=0.0, le=1.0, allow_inf_nan=False,
                            description="0 keeps the input (refused: nothing to do), 1 ignores it almost entirely")
    output_format: str = Field("jpeg", description="encoding of the result (jpg is accepted for jpeg)",
                               json_schema_extra={"enum": list(imgs.OUTPUT_FORMATS)})
    base64: bool = Field(False, description="return the encoded image as base64 text instead of raw bytes")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="random when omitted; echoed in x-seed")
    num_inference_steps: int = Field(DEFAULT_STEPS, ge=1, description="denoising schedule length")
    guidance_scale: float = Field(DEFAULT_GUIDANCE, ge=0.0, le=30.0, allow_inf_nan=False,
                                  description="classifier-free guidance; <= 1 turns it off")

    @field_validator("output_format")
    @classmethod
    def _known_format(cls, v: str) -> str:
        try:
            return imgs.normalize_format(v)
        except Sd3trtError as e:
            raise ValueError(str(e)) from None


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.code, self.message, self.field = status, code, message, field
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, field: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "code": code, "status": status}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status, headers=headers)


_FIELD_MSG = {
    "missing": "{f} is required",
    "extra_forbidden": "unknown field {f!r}; the fields are " + ", ".join(Img2ImgRequest.model_fields),
}


def validation_error(e: ValidationError) -> ApiError:
    err = e.errors(include_url=False, include_input=False)[0]
    f = ".".join(str(p) for p in err["loc"]) or "body"
    tmpl = _FIELD_MSG.get(err["type"])
    msg = tmpl.format(f=f) if tmpl else f"{f}: {err['msg'].removeprefix('Value error, ')}"
    return ApiError(422, "invalid_field", msg, field=f)


def parse(body: bytes | bytearray, max_prompt_chars: int, max_steps: int) -> Img2ImgRequest:
    """The request body -> a validated request; raises ApiError (400 not JSON, 422 a field)."""
    def no_constants(name):
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise ApiError(400, "bad_json", "the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise ApiError(422, "invalid_field", "the request body must be a JSON object")
    try:
        req = Img2ImgRequest.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None
    for name in ("prompt", "negative_prompt"):
        if len(getattr(req, name)) > max_prompt_chars:
            raise ApiError(422, "invalid_field", f"{name} is longer than {max_prompt_chars} characters", field=name)
    if req.num_inference_steps > max_steps:
        raise ApiError(422, "invalid_field", f"num_inference_steps must be at most {max_steps}",
                       field="num_inference_steps")
    return req
