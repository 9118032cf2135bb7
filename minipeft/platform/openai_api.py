"""The OpenAI-compatible endpoints, so the official `openai` client (base_url=http://HOST:PORT/v1)
talks to a fine-tuned model as it would to the cloud:

    POST /v1/chat/completions   messages -> the deployment's chat template -> reply (stream: SSE)
    POST /v1/completions        raw prompt (bos/eos as tokenizer_config.json says) -> continuation (stream: SSE)
    GET  /v1/models             the base models and the deployments
    GET  /v1/models/{model}     one of them
    DELETE /v1/models/{model}   a fine-tuned model, by its name (refused for a base model, a deployment
                                or a model in use: state.py)

`model` selects a base model or a deployment (404, code "model_not_found", otherwise). Messages
take OpenAI's shapes: role "developer" is the system turn (OpenAI's newer name for it), content
may be a list of text parts (concatenated, as Qwen2's template does), and an assistant turn's
content may be null (an empty reply). Sampling: temperature 0 is greedy (OpenAI's default is 1),
top_p is nucleus sampling (0: the most likely token only), seed makes sampling repeatable,
presence_penalty and frequency_penalty (in [-2, 2]) penalize tokens the reply already has, by
OpenAI's formula (greedy replies too), max_tokens (or max_completion_tokens) caps the reply, which
also ends at the template's stop ids and before the first of the `stop` strings (up to 4;
finish_reason "stop"; a stream holds back text that may begin one); null, for any field of the
request or of a message, is its default (for a field not implemented here: absent, as is false
for logprobs and echo), and a message's name is accepted and not rendered. A completion's text
continues its prompt's: prompt + text is the text of all the tokens. Refused with 400 and the
reason: a prompt that leaves no room in the model's context, max_tokens over the server's limit or
the room left, n > 1, a `stop` of another shape, stream_options without stream: true (as OpenAI
does), and any other field this server does not implement (rather than ignoring it and answering
something else than was asked for).
Streaming sends `data: {chunk}` events and a final `data: [DONE]`, as OpenAI does.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, Iterator, Literal, Optional, Sequence, Union

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..templates import ChatTemplate
from ..tokenizer import Tokenizer, check_unicode
from .errors import MODEL_NOT_FOUND, ApiError, cut, error_body, not_found, shown
from .inference import Loaded, Sampling, StopText, TextStream, stream_tokens
from .state import Platform

IGNORED_FIELDS = {"user", "metadata", "store"}  # bookkeeping that does not change the answer
# Fields not implemented here whose default asks for nothing: sent as that default they are taken.
OFF_BY_DEFAULT = {"logprobs", "echo"}  # false: no log-probabilities, the prompt not repeated


def _without_nulls(data: Any, keep: Sequence[str] = ()) -> Any:
    """OpenAI's API takes null for any optional field, meaning its default, and clients send it:
    those that serialize every field, and a reply sent back as `message.model_dump()` (refusal,
    tool_calls, ... null). A null asks for nothing, so it is dropped, also where this server does
    not implement the field; `keep`: fields whose null the model itself judges."""
    if isinstance(data, dict):
        return {k: v for k, v in data.items() if v is not None or k in keep}
    return data


def _json(value: Any) -> str:
    """A value as the client sent it (JSON's spelling: true, null, {...}), cut to SHOWN characters."""
    return cut(json.dumps(value, ensure_ascii=False))


class ContentPart(BaseModel):
    """A part of a message's content; any type parses, so that Message can name the one refused."""
    model_config = ConfigDict(extra="allow")
    type: str
    text: Optional[str] = None


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[ContentPart], None]
    name: Optional[str] = None  # a participant's name: accepted, not rendered (no template here has a slot)

    @model_validator(mode="before")
    @classmethod
    def _null_is_nothing(cls, data: Any) -> Any:
        return _without_nulls(data, keep=("content",))  # null content: an empty reply, or refused below

    @field_validator("content", mode="before")
    @classmethod
    def _content_shape(cls, value: Any) -> Any:
        """A wrong shape said once: the union alone reports each member's error for one value
        ("content.str: ...; content.list[ContentPart].0: ..."). _text_only then checks the parts' types."""
        if value is None or isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(f"expected a string, a list of text parts or null (got {_json(value)})")
        for i, part in enumerate(value):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str) or not isinstance(
                    part.get("text", ""), (str, type(None))):
                raise ValueError(f'part {i}: expected an object {{"type": "text", "text": "..."}} '
                                 f"(got {_json(part)})")
        return value

    @model_validator(mode="after")
    def _text_only(self) -> "Message":
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content: required in a {self.role} turn (null is allowed for assistant turns only)")
        for i, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.type != "text":
                raise ValueError(f"content.{i}: part type {shown(part.type)} is not supported; this server takes "
                                 'text parts only, {"type": "text", "text": ...}')
            if part.text is None:
                raise ValueError(f"content.{i}.text: required")
        check_unicode(self.turn()["content"], "content")  # where the client sent it, not the rendered prompt
        return self

    def turn(self) -> dict[str, str]:
        """The {"role", "content": text} a chat template renders."""
        content = self.content or ""
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)
    include_usage: bool = False


class SamplingRequest(BaseModel):
    # strict: true is no max_tokens, "5" no integer, "yes" no stream flag (JSON's 1 still is a float)
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)
    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, ge=0, le=1)  # 0: only the most likely token (greedy), as OpenAI allows
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)  # torch.Generator's range
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Any] = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    @model_validator(mode="before")
    @classmethod
    def _null_is_the_default(cls, data: Any) -> Any:
        return _without_nulls(data)

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions, info: ValidationInfo) -> StreamOptions:
        # OpenAI refuses them too: options for a stream that is not sent would be silently ignored
        if not info.data.get("stream"):
            raise ValueError("only allowed when stream is true")
        return value


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str


class Reply:
    """Text deltas of a token stream, cut before the first stop string, then its finish_reason and
    token count (the one that completed a stop string included: it was generated). context: the
    ids the reply continues (TextStream's)."""

    def __init__(self, tokens: Iterator[int], tokenizer: Tokenizer, max_tokens: int, stop: Sequence[str] = (),
                 context: Sequence[int] = ()):
        self.tokens, self.text, self.stop = tokens, TextStream(tokenizer, context), StopText(stop)
        self.max_tokens, self.count, self.finish_reason = max_tokens, 0, None

    def __iter__(self) -> Iterator[str]:
        for token in self.tokens:
            self.count += 1
            if delta := self.stop.push(self.text.push(token)):
                yield delta
            if self.stop.stopped:  # the tokens' generator is left there: nothing more is generated
                break
        if not self.stop.stopped and (tail := self.stop.push(self.text.finish()) + self.stop.finish()):
            yield tail
        self.finish_reason = "stop" if self.stop.stopped or self.count < self.max_tokens else "length"


def _sampling(req: SamplingRequest, prompt_tokens: int, context: int, virtual: int, limit: int) -> Sampling:
    """The request's sampling settings, checked: its prompt and reply fit the model's context after
    the adapter's `virtual` tokens (prefix or prompt tuning)."""
    unknown = {k for k, v in (req.model_extra or {}).items()
               if k not in IGNORED_FIELDS and not (k in OFF_BY_DEFAULT and v is False)}
    if unknown:
        raise ApiError(400, f"unsupported field(s) [{', '.join(map(shown, sorted(unknown)))}]: this server "
                       "implements model, messages/prompt, max_tokens, max_completion_tokens, temperature, top_p, "
                       "n=1, seed, stop, presence_penalty, frequency_penalty, stream, stream_options",
                       param=sorted(unknown)[0])
    field = "max_completion_tokens" if req.max_completion_tokens else "max_tokens"  # the one obeyed: name it
    asked = getattr(req, field)
    if asked is not None and asked > limit:
        raise ApiError(400, f"{field}={shown(asked)} is over this server's limit of {limit}", param=field)
    room, after = context - virtual - prompt_tokens, f" after {virtual} virtual tokens" if virtual else ""
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, which fills the model's context of "
                       f"{context} tokens{after}; shorten it",
                       param="prompt" if isinstance(req, CompletionRequest) else "messages")
    if asked is not None and asked > room:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) + {field} ({asked}) exceeds the model's "
                       f"context of {context} tokens{after}; lower {field} to {room} or less", param=field)
    return Sampling(asked or min(limit, room), req.temperature, req.top_p, req.seed, req.presence_penalty,
                    req.frequency_penalty)


def _stop_strings(stop: Any) -> list[str]:
    """OpenAI's `stop`: a string or a list of up to 4 (its limit) non-empty strings."""
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) and s for s in stops):
        raise ApiError(400, "stop: expected a string or a list of up to 4 non-empty strings, got "
                       f"{_json(stop)}", param="stop")
    return stops


def _usage(prompt_tokens: int, reply: Reply) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": reply.count,
            "total_tokens": prompt_tokens + reply.count}


def _sse(events: Iterator[dict[str, Any]]) -> Iterator[str]:
    """Server-sent events; an error after the response started is sent as one last event."""
    try:
        for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except Exception as e:  # the status line is gone already: report in-band, as OpenAI does
        message = str(e) if isinstance(e, ValueError) else f"{type(e).__name__}: {e}"
        yield f"data: {json.dumps(error_body(500, message))}\n\n"
        return
    yield "data: [DONE]\n\n"


def _run(reply: Reply, model: str) -> str:
    """The whole reply of a non-streaming request."""
    try:
        return "".join(reply)
    except ValueError as e:  # the deployment was removed while the request ran
        raise not_found("model", model, str(e), code=MODEL_NOT_FOUND) from None


def openai_router(platform: Platform) -> APIRouter:
    router = APIRouter()

    def start(req: SamplingRequest, prompt: list[int], loaded: Loaded, adapter: Optional[str],
              template: ChatTemplate) -> Reply:
        sampling = _sampling(req, len(prompt), loaded.context, loaded.virtual_tokens(adapter),
                             platform.settings.max_tokens)
        stop = [] if req.stop is None else _stop_strings(req.stop)
        stop_ids = template.stop_token_ids(loaded.tokenizer)
        # a completion continues its prompt's text (prompt + text is the whole); a chat reply is a text of its own
        context = prompt if isinstance(req, CompletionRequest) else ()
        return Reply(stream_tokens(loaded, adapter, prompt, sampling, stop_ids), loaded.tokenizer,
                     sampling.max_tokens, stop, context)

    def stream(reply: Reply, prompt_tokens: int, req: SamplingRequest, head: dict[str, Any], kind: str):
        def events() -> Iterator[dict[str, Any]]:
            if kind == "chat":
                yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None, "logprobs": None}]}
            field = "delta" if kind == "chat" else "text"
            for delta in reply:
                text = {"content": delta} if kind == "chat" else delta
                yield {**head, "choices": [{"index": 0, field: text, "finish_reason": None, "logprobs": None}]}
            last = {} if kind == "chat" else ""
            yield {**head, "choices": [{"index": 0, field: last, "finish_reason": reply.finish_reason,
                                        "logprobs": None}]}
            if req.stream_options and req.stream_options.include_usage:
                yield {**head, "choices": [], "usage": _usage(prompt_tokens, reply)}
        return StreamingResponse(_sse(events()), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @router.post("/v1/chat/completions")
    def chat(req: ChatRequest):
        loaded, adapter, template = platform.serve(req.model)
        try:
            prompt = template.render_prompt([m.turn() for m in req.messages], loaded.tokenizer)
        except ValueError as e:
            raise ApiError(400, f"messages: {e}", param="messages") from None
        reply = start(req, prompt, loaded, adapter, template)
        head = {"id": f"chatcmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": req.model}
        if req.stream:
            return stream(reply, len(prompt), req, {**head, "object": "chat.completion.chunk"}, "chat")
        text = _run(reply, req.model)
        return {**head, "object": "chat.completion", "usage": _usage(len(prompt), reply),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": reply.finish_reason, "logprobs": None}]}

    @router.post("/v1/completions")
    def completions(req: CompletionRequest):
        loaded, adapter, template = platform.serve(req.model)
        try:
            tok = loaded.tokenizer  # the prompt's bos/eos as transformers' encode() (and vLLM's server) add them
            prompt = tok.encode(req.prompt, bos=tok.add_bos_token, eos=tok.add_eos_token)
        except ValueError as e:
            raise ApiError(400, f"prompt: {e}", param="prompt") from None
        if not prompt:
            raise ApiError(400, "prompt: empty, and this model's tokenizer adds no bos to start from", param="prompt")
        reply = start(req, prompt, loaded, adapter, template)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "created": int(time.time()), "model": req.model,
                "object": "text_completion"}
        if req.stream:
            return stream(reply, len(prompt), req, head, "text")
        text = _run(reply, req.model)
        return {**head, "usage": _usage(len(prompt), reply),
                "choices": [{"index": 0, "text": text, "finish_reason": reply.finish_reason, "logprobs": None}]}

    def card(name: str, created: int) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "minipeft"}

    @router.get("/v1/models")
    def list_models():
        bases = [card(name, 0) for name in platform.bases]
        deployed = [card(d["name"], d["created_at"]) for d in platform.store.rows("deployments")]
        return {"object": "list", "data": bases + deployed}

    @router.get("/v1/models/{name}")
    def get_model(name: str):
        platform.target(name)
        deployment = platform.store.get("deployments", name)
        return card(name, deployment["created_at"] if deployment else 0)

    @router.delete("/v1/models/{name}")
    def delete_model(name: str):
        platform.delete_model(name)
        return {"id": name, "object": "model", "deleted": True}

    return router
