"""The OpenAI API bodies the builtin server reads and writes (`/v1/completions`,
`/v1/chat/completions`, `/v1/models`), as msgspec Structs, and its error object. No I/O, no
torch.

Requests are decoded strictly by type and range (a wrong type or value is an `ApiError`, a 400
naming the field), and leniently by name: fields this server does not know are ignored, as
vLLM's OpenAI server and OpenAI's own API ignore them, so clients that send more than is read
keep working. Fields it knows but cannot honour (`logprobs`, tools, other response formats) are
refused with a 400 naming them rather than silently dropped.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, TypeVar

import msgspec

MAX_N = 128
"""Choices one request may ask for (OpenAI's own limit)."""
MAX_STOP = 16
"""Stop sequences one request may give."""
MAX_PROMPTS = 64
"""Prompts in one completions request."""

Temperature = Annotated[float, msgspec.Meta(ge=0, le=2)]
TopP = Annotated[float, msgspec.Meta(gt=0, le=1)]
Penalty = Annotated[float, msgspec.Meta(ge=-2, le=2)]
Count = Annotated[int, msgspec.Meta(ge=1, le=MAX_N)]
Tokens = Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]
Seed = Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
Stop = str | Annotated[list[str], msgspec.Meta(max_length=MAX_STOP)]


class ApiError(Exception):
    """An error answered with OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> ErrorBody:
        """The JSON body: `{"error": {"message", "type", "param", "code"}}`."""
        return ErrorBody(ErrorDetail(self.message, self.type, self.param, self.code))


class ErrorDetail(msgspec.Struct):
    """OpenAI's error object."""

    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    """The body of every error answer."""

    error: ErrorDetail


class StreamOptions(msgspec.Struct):
    """`stream_options`: whether a last chunk carries the usage."""

    include_usage: bool = False
    continuous_usage_stats: bool = False


class Sampling(msgspec.Struct):
    """What both endpoints share: the model, how many tokens and choices, sampling, stops."""

    model: str | None = None
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    n: Count = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: int | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    seed: Seed | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    best_of: int | None = None
    user: str | None = None

    def stops(self) -> list[str]:
        """The stop sequences, empty ones left out."""
        if self.stop is None:
            return []
        return [s for s in ([self.stop] if isinstance(self.stop, str) else self.stop) if s]

    def token_limit(self) -> int | None:
        """The completion's token limit as asked (`max_completion_tokens` wins), or None."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def check(self) -> None:
        """What types alone do not say."""
        if self.stream_options is not None and not self.stream:
            raise ApiError(
                400, "stream_options can only be given when stream is true", param="stream_options"
            )
        if self.best_of is not None and self.best_of != self.n:
            raise ApiError(400, "best_of other than n is not supported by this server", param="best_of")
        if self.top_k is not None and self.top_k < -1:
            raise ApiError(400, "top_k must be -1 (off), 0 (off) or a positive number", param="top_k")


TokenIds = list[int]


class CompletionRequest(Sampling):
    """`POST /v1/completions`."""

    prompt: str | list[str | int | TokenIds] = msgspec.field(default_factory=list)
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None

    def prompts(self, vocab: int) -> list[str | list[int]]:
        """The prompts: each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError(
                400, "prompt must be a string, a list of strings or a list of token ids", param="prompt"
            )
        if all(isinstance(x, str) for x in p):
            out: list[str | list[int]] = [x for x in p if isinstance(x, str)]
        elif all(isinstance(x, int) for x in p):
            out = [[x for x in p if isinstance(x, int)]]
        elif all(isinstance(x, list) for x in p):
            out = [x for x in p if isinstance(x, list)]
        else:
            raise ApiError(
                400, "prompt mixes strings, token ids and lists of token ids: give one kind", param="prompt"
            )
        if len(out) > MAX_PROMPTS:
            raise ApiError(400, f"at most {MAX_PROMPTS} prompts in one request", param="prompt")
        for ids in out:
            if isinstance(ids, list):
                if not ids:
                    raise ApiError(400, "a prompt of token ids is empty", param="prompt")
                if any(not 0 <= t < vocab for t in ids):
                    raise ApiError(400, f"token ids must be between 0 and {vocab - 1}", param="prompt")
        return out

    def check(self) -> None:
        super().check()
        if self.logprobs is not None:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if self.suffix:
            raise ApiError(400, "suffix is not supported by this server", param="suffix")


class TextPart(msgspec.Struct):
    """One part of a message's content."""

    type: str
    text: str | None = None


class Message(msgspec.Struct):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self, index: int) -> str:
        """The content as text: parts other than text are refused."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(
                    400,
                    f"content parts of type {part.type!r} are not supported: this model reads text",
                    param=f"messages[{index}].content",
                )
            out.append(part.text)
        return "".join(out)


class ResponseFormat(msgspec.Struct):
    """`response_format`: only plain text is produced."""

    type: str = "text"


class ChatRequest(Sampling):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[Message], msgspec.Meta(max_length=4096)] = msgspec.field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None

    def check(self) -> None:
        super().check()
        if not self.messages:
            raise ApiError(400, "messages must hold at least one message", param="messages")
        if self.logprobs or self.top_logprobs:
            raise ApiError(400, "logprobs are not supported by this server", param="logprobs")
        if self.tools:
            raise ApiError(400, "tools are not supported by this server", param="tools")
        if self.tool_choice not in (None, "none", "auto"):  # without tools, "auto" calls none
            raise ApiError(400, "tool_choice is not supported by this server", param="tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(
                400, "only the text response_format is supported by this server", param="response_format"
            )

    def plain_messages(self) -> list[dict[str, str]]:
        """The messages as chat templates read them."""
        return [{"role": m.role, "content": m.text(i)} for i, m in enumerate(self.messages)]


R = TypeVar("R", bound=Sampling)

_MISSING = re.compile(r"missing required field `([^`]+)`")
_AT = re.compile(r" - at `\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`")


def decode_request(raw: bytes, kind: type[R], required: str) -> R:
    """Decode and check a request body; every problem is an `ApiError` (400) naming the field."""
    if not raw.strip():
        raise ApiError(400, "the request body is empty: expected a JSON object")
    try:
        obj = msgspec.json.decode(raw)
    except msgspec.DecodeError as exc:
        raise ApiError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise ApiError(400, "the request body must be a JSON object")
    if required not in obj:
        raise ApiError(400, f"missing required parameter: {required!r}", param=required)
    try:
        req = msgspec.convert(obj, kind)
    except msgspec.ValidationError as exc:
        raise ApiError(400, f"invalid request: {exc}", param=_param(str(exc))) from None
    req.check()
    return req


def _param(message: str) -> str | None:
    """The field a msgspec validation message names, as OpenAI names it (`messages[0].role`)."""
    missing = _MISSING.search(message)
    at = _AT.search(message)
    path = at.group(1).lstrip(".") if at else ""
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None


# ---------------------------------------------------------------- answers


class Usage(msgspec.Struct):
    """Tokens read and written."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ModelCard(msgspec.Struct):
    """One entry of `/v1/models`."""

    id: str
    max_model_len: int
    object: str = "model"
    created: int = 0
    owned_by: str = "gswarm"
    root: str | None = None


class ModelList(msgspec.Struct):
    """`GET /v1/models`."""

    data: list[ModelCard]
    object: str = "list"


FinishReason = Literal["stop", "length"] | None


class CompletionChoice(msgspec.Struct):
    """One choice of a completion (or a chunk of one)."""

    index: int
    text: str
    finish_reason: FinishReason
    logprobs: None = None


class Completion(msgspec.Struct):
    """A text completion, or one chunk of a streamed one (`usage` on the last, when asked)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    object: str = "text_completion"
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatMessage(msgspec.Struct):
    """The assistant's message."""

    content: str
    role: str = "assistant"


class ChatChoice(msgspec.Struct):
    """One choice of a chat completion."""

    index: int
    message: ChatMessage
    finish_reason: FinishReason
    logprobs: None = None


class ChatCompletion(msgspec.Struct):
    """A chat completion."""

    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    """What a chat chunk adds to a choice: the role first, then content."""

    role: str | None = None
    content: str | None = None


class ChatChunkChoice(msgspec.Struct):
    """One choice's part of a chat chunk."""

    index: int
    delta: Delta
    finish_reason: FinishReason
    logprobs: None = None


class ChatChunk(msgspec.Struct):
    """One chunk of a streamed chat completion (the usage chunk has no choices)."""

    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    object: str = "chat.completion.chunk"
    usage: Usage | None = None
    system_fingerprint: str | None = None
