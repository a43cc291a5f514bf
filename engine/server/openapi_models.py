"""Pydantic models of the wire bodies, for the OpenAPI document only (openapi.py).

The route handlers keep their own parsing (fastllava.schema, chat.py): these models describe what
they accept and answer, they validate nothing at request time. The fal input is derived from
`fastllava.schema.GenerationRequest` (fields, types, defaults) with the ranges schema.py enforces
under this server's limits, so the document cannot drift from the validator.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model

from fastllava import schema

_FAL_DOCS = {
    "image_url": "http(s) URL or data: URI of the image (local paths are refused over HTTP)",
    "prompt": "the question or instruction about the image",
    "max_tokens": "most tokens to generate",
    "temperature": "sampling temperature; 0 = greedy",
    "top_p": "nucleus sampling mass",
    "seed": "makes sampling reproducible",
}


def _drop_default(field_schema: dict) -> None:
    field_schema.pop("default", None)


def fal_input_model(max_tokens_limit: int, max_prompt_chars: int) -> type[BaseModel]:
    """The fal model input: GenerationRequest's fields and defaults, schema.py's ranges."""
    ranges = {  # what schema._validate checks, with the server's limits
        "image_url": {"min_length": 1},
        "prompt": {"min_length": 1, "max_length": max_prompt_chars},
        "max_tokens": {"ge": 1, "le": max_tokens_limit},
        "temperature": {"ge": 0, "le": schema.TEMPERATURE_MAX},
        "top_p": {"gt": 0, "le": 1},
        "seed": {"ge": 0, "lt": schema.SEED_LIMIT},
    }
    hints = typing.get_type_hints(schema.GenerationRequest)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(schema.GenerationRequest):
        default = ... if f.default is dataclasses.MISSING else f.default
        fields[f.name] = (hints[f.name], Field(default, description=_FAL_DOCS.get(f.name),
                                              **ranges[f.name]))
    for alias, canonical in schema.ALIASES.items():
        fields[alias] = (hints[canonical], Field(
            None, description=f"alias of {canonical} (fal-ai/llavav15-13b spelling); give one",
            json_schema_extra=_drop_default, **ranges[canonical]))
    return create_model("FalInput", __config__=ConfigDict(extra="forbid"), **fields)


# ---- fal ----------------------------------------------------------------------------------------
class FalOutput(BaseModel):
    output: str
    partial: bool = Field(description="true for an in-progress snapshot (streaming)")


class LogItem(BaseModel):
    message: str
    level: str
    source: str
    timestamp: str | None


class QueueUrls(BaseModel):
    request_id: str
    response_url: str
    status_url: str
    cancel_url: str


class QueueSubmitted(QueueUrls):
    status: Literal["IN_QUEUE"]
    queue_position: int
    gateway_request_id: str | None = Field(None, description="= request_id, with fal_webhook")


class InferenceMetrics(BaseModel):
    inference_time: float


class QueueStatus(QueueUrls):
    status: Literal["IN_QUEUE", "IN_PROGRESS", "COMPLETED"]
    logs: list[LogItem] | None = Field(description="always present; null unless ?logs=1")
    queue_position: int | None = Field(None, description="only while IN_QUEUE")
    metrics: InferenceMetrics | None = Field(None, description="only when COMPLETED")
    error: str | None = Field(None, description="a failed or cancelled job")
    error_type: str | None = None


class CancelAnswer(BaseModel):
    status: Literal["CANCELLATION_REQUESTED", "ALREADY_COMPLETED", "NOT_FOUND"]
    detail: str | None = None
    error_type: str | None = None


class ValidationItem(BaseModel):
    loc: list[Union[str, int]]
    msg: str
    type: str
    ctx: dict[str, Any] | None = None


class FalValidationError(BaseModel):
    detail: list[ValidationItem]
    error_type: str | None = Field(None, description="set on a queued job's stored error")


class FalError(BaseModel):
    detail: str
    error_type: str


class Health(BaseModel):
    status: Literal["ok"]
    endpoint_id: str
    queue: dict[str, int] = Field(description="job counts: IN_QUEUE, IN_PROGRESS")


class Unhealthy(BaseModel):
    status: Literal["unhealthy"]
    detail: str


# ---- OpenAI -------------------------------------------------------------------------------------
class ImageUrl(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageUrl | str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart | ImagePart]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Up to --max-images-per-request images in the chat, or none; other OpenAI fields (user,
    metadata, ...) are ignored; tools, penalties, logit_bias and the vLLM sampling extensions
    (top_k, min_p, ...) are refused with a 400."""
    model: str = Field(description="the endpoint id (GET /v1/models)")
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1, description="default --default-chat-max-tokens")
    max_completion_tokens: int | None = Field(None, ge=1, description="wins over max_tokens")
    temperature: float = Field(1.0, ge=0, le=schema.TEMPERATURE_MAX)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16, description="choices; the prompt is prefilled once")
    logprobs: bool | None = Field(None, description="raw log-probabilities (before temperature "
                                  "and top-p) of the generated tokens")
    top_logprobs: int | None = Field(None, ge=0, le=schema.MAX_TOP_LOGPROBS,
                                     description="alternatives per token; needs logprobs")
    stop: str | list[str] | None = Field(None, description="up to 4 strings")
    seed: int | None = Field(None, ge=0, lt=schema.SEED_LIMIT)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="vLLM's / SGLang's extension: the end-of-sequence "
                             "ids do not stop a choice, which runs to max_tokens")


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str


class Choice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="image tokens included")
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


RESPONSE_MODELS = (FalOutput, QueueSubmitted, QueueStatus, CancelAnswer, FalValidationError,
                   FalError, Health, Unhealthy, ChatCompletion, ChatCompletionChunk, OpenAIError,
                   ModelList)
