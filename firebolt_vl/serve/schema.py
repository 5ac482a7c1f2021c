"""The OpenAI chat-completions request as Pydantic models, and OpenAI-shaped errors.

Types are checked strictly (a string is not a number, `true` is not an integer); fields this server does not use
(`user`, `frequency_penalty`, `metadata`, ...) are ignored, as other OpenAI-compatible servers do. What the model cannot
do (n > 1, logprobs / top_logprobs, tools) is refused with a 400 that says so. Extensions as vLLM and llama.cpp's
server have them: `min_p`, `repetition_penalty` (the release's recommended decoding uses 1.05), `ignore_eos`.

Error body, whatever the status: {"error": {"message": str, "type": str, "param": str | None, "code": str | None}}.
    400 invalid_request_error   bad JSON, bad values, unusable images, prompt too long, refused image sources
    401 authentication_error    missing or wrong API key
    404 invalid_request_error   unknown route or model
    413 invalid_request_error   request body over the byte limit
    422 invalid_request_error   the body does not match the schema (wrong types, missing fields)
    429 rate_limit_error        the queue is full
    500 server_error            a bug (the server keeps running)
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError


class APIError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[Message]
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)  # extension (as vLLM / llama.cpp)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)  # extension (as vLLM / llama.cpp)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list | None = None
    ignore_eos: bool = False  # extension (as vLLM): always produce max_tokens tokens


_FIELD_NAMES = set()
for _cls in (ImageURL, TextPart, ImagePart, Message, StreamOptions, ChatCompletionRequest):
    _FIELD_NAMES |= set(_cls.model_fields)


def validation_error(e: ValidationError) -> APIError:
    """Pydantic's first error as a 422 naming the field ("messages.0.content")."""
    errors = e.errors(include_url=False)
    first = min(errors, key=lambda err: len(err["loc"]))  # the shallowest problem reads best for unions
    path = []
    for part in first["loc"]:
        if isinstance(part, int) or part in _FIELD_NAMES:
            path.append(str(part))
        else:
            break  # union member names ("str", "list[...]") are not part of the request
    param = ".".join(path) or None
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
    return APIError(422, message, param=param, code="invalid_type" if "type" in first["type"] else first["type"])
