"""The OpenAI-compatible endpoints, so the official `openai` client (base_url=http://HOST:PORT/v1)
talks to a fine-tuned model as it would to the cloud:

    POST /v1/chat/completions   messages -> the deployment's chat template -> reply (stream: SSE)
    POST /v1/completions        raw prompt (bos + text) -> continuation (stream: SSE)
    GET  /v1/models             the base models and the deployments

`model` selects a base model or a deployment. Sampling: temperature 0 is greedy (OpenAI's
default is 1), top_p is nucleus sampling, seed makes sampling repeatable, max_tokens (or
max_completion_tokens) caps the reply, which also ends at the template's stop ids. Refused with
400 and the reason: a prompt that leaves no room in the model's context, max_tokens over the
server's limit or the room left, n > 1, stop sequences, and any other field this server does not
implement (rather than ignoring it and answering something else than was asked for).
Streaming sends `data: {chunk}` events and a final `data: [DONE]`, as OpenAI does.
"""
from __future__ import annotations

import json
import secrets
import time
from typing import Any, Iterator, Literal, Optional

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from ..templates import ChatTemplate
from .errors import ApiError, error_body, not_found
from .inference import Loaded, Sampling, TextStream, stream_tokens
from .state import Platform

IGNORED_FIELDS = {"user", "metadata", "store"}  # bookkeeping that does not change the answer


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class SamplingRequest(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)
    model: str = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)  # torch.Generator's range
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Any] = None


class ChatRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: str


class Reply:
    """Text deltas of a token stream, then its finish_reason and token count."""

    def __init__(self, tokens: Iterator[int], loaded: Loaded, max_tokens: int):
        self.tokens, self.text, self.max_tokens = tokens, TextStream(loaded.tokenizer), max_tokens
        self.count, self.finish_reason = 0, None

    def __iter__(self) -> Iterator[str]:
        for token in self.tokens:
            self.count += 1
            if delta := self.text.push(token):
                yield delta
        if tail := self.text.finish():
            yield tail
        self.finish_reason = "length" if self.count >= self.max_tokens else "stop"


def _sampling(req: SamplingRequest, prompt_tokens: int, loaded: Loaded, limit: int) -> Sampling:
    unknown = set(req.model_extra or {}) - IGNORED_FIELDS
    if unknown:
        raise ApiError(400, f"unsupported field(s) {sorted(unknown)}: this server implements model, messages/prompt, "
                       "max_tokens, max_completion_tokens, temperature, top_p, n=1, seed, stream, stream_options",
                       param=sorted(unknown)[0])
    if req.stop is not None:
        raise ApiError(400, "stop sequences are not supported: a reply ends at the chat template's stop tokens "
                       "or at max_tokens", param="stop")
    asked = req.max_completion_tokens or req.max_tokens
    if asked is not None and asked > limit:
        raise ApiError(400, f"max_tokens={asked} is over this server's limit of {limit}", param="max_tokens")
    room = loaded.context - prompt_tokens
    if room < 1:
        raise ApiError(400, f"the prompt is {prompt_tokens} tokens, which fills the model's context of "
                       f"{loaded.context} tokens; shorten it", param="messages")
    if asked is not None and asked > room:
        raise ApiError(400, f"the prompt ({prompt_tokens} tokens) + max_tokens ({asked}) exceeds the model's "
                       f"context of {loaded.context} tokens; lower max_tokens to {room} or less", param="max_tokens")
    return Sampling(asked or min(limit, room), req.temperature, req.top_p, req.seed)


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
        raise not_found("model", model, str(e)) from None


def openai_router(platform: Platform) -> APIRouter:
    router = APIRouter()

    def start(req: SamplingRequest, prompt: list[int], loaded: Loaded, adapter: Optional[str],
              template: ChatTemplate) -> Reply:
        sampling = _sampling(req, len(prompt), loaded, platform.settings.max_tokens)
        stop_ids = template.stop_token_ids(loaded.tokenizer)
        return Reply(stream_tokens(loaded, adapter, prompt, sampling, stop_ids), loaded, sampling.max_tokens)

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
            prompt = template.render_prompt([m.model_dump() for m in req.messages], loaded.tokenizer)
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
        prompt = loaded.tokenizer.encode(req.prompt, bos=True)
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

    return router
