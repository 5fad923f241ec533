"""An OpenAI-compatible server for a nanojax run, with continuous batching and a chat page.

    python -m nanojax.serve RUN_DIR [--step N] [--host 127.0.0.1] [--port 8000] [--slots 16] [--api-key KEY]

Routes: `POST /v1/chat/completions` (messages, stream, temperature, top_p, top_k, max_tokens /
max_completion_tokens, stop, n, seed, stream_options.include_usage), `POST /v1/completions` (a prompt string:
for base models), `GET /v1/models`, `GET /health`, `GET /` (the chat page: self-contained, works offline).
Every request goes to one `nanojax.batcher.Batcher`, so concurrent requests decode together; the event loop
only queues work and relays tokens (it never waits on the device); a client that disconnects frees its slot.
Errors come in OpenAI's shape `{"error": {"message", "type", "param", "code"}}`: 400 bad request (the
message names the field), 401 wrong or missing key, 413 body over 1 MB, 503 too many waiting requests.
FastAPI + uvicorn + sse-starlette: `pip install -e '.[serve]'`. Binds 127.0.0.1 unless `--host` says otherwise.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import queue
import secrets
import sys
import threading
import time
from typing import Literal, Union

from nanojax.batcher import Batcher, Request
from nanojax.conversation import validate

try:  # the [serve] extra
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from fastapi import Depends, FastAPI, HTTPException
    from fastapi import Request as HTTPRequest
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import HTMLResponse, JSONResponse
    from pydantic import BaseModel, ConfigDict, Field
    from sse_starlette import EventSourceResponse
except ImportError as e:  # pragma: no cover - import-time hint
    raise SystemExit(f"nanojax.serve needs the serve extra ({e.name} is missing): pip install -e '.[serve]'") from e

PAGE = pathlib.Path(__file__).parent / "static" / "chat.html"
MAX_BODY_BYTES = 1 << 20
READ_TIMEOUT_S = 10.0  # a client gets this long to send a request's head, and each piece of its body
MAX_CONNECTIONS = 256  # beyond this, uvicorn answers 503 at once
LIMITS = {"messages": 500, "chars_per_message": 8000, "chars_total": 32000}


# -- the OpenAI request schema (unknown fields are ignored, as OpenAI-compatible servers do) -------------
class Part(BaseModel):
    type: Literal["text", "python", "python_output"]
    text: str = Field(max_length=LIMITS["chars_per_message"])


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[Part]]


class Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    stream: bool = False
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1000)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    stop: Union[str, list[str], None] = None
    n: int = Field(1, ge=1, le=16)
    seed: int | None = Field(None, ge=0, lt=2**32)
    stream_options: dict | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1, max_length=LIMITS["messages"])


class CompletionRequest(Sampling):
    prompt: str = Field(max_length=LIMITS["chars_total"])


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


def error_body(message: str, kind: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- request -> prompt and settings -------------------------------------------------------------------
def chat_prompt(tokenizer, body: ChatRequest) -> list[int]:
    messages = [{"role": m.role, "content": m.content if isinstance(m.content, str)
                 else [p.model_dump() for p in m.content]} for m in body.messages]
    total = sum(len(c) if isinstance(c, str) else sum(len(p["text"]) for p in c)
                for c in (m["content"] for m in messages))
    long = [i for i, m in enumerate(messages) if isinstance(m["content"], str)
            and len(m["content"]) > LIMITS["chars_per_message"]]
    if long:
        raise APIError(400, f"messages[{long[0]}].content is longer than {LIMITS['chars_per_message']} characters",
                       f"messages[{long[0]}].content")
    if total > LIMITS["chars_total"]:
        raise APIError(400, f"the conversation has {total} characters; at most {LIMITS['chars_total']}", "messages")
    if messages[-1]["role"] != "user":
        raise APIError(400, "the last message must be from the user", "messages")
    try:
        validate({"messages": messages})
    except ValueError as e:
        raise APIError(400, str(e), "messages") from None
    return tokenizer.render_for_completion({"messages": messages + [{"role": "assistant", "content": "…"}]},
                                           max_tokens=10**9)


def budget(body: Sampling, prompt_len: int, seq_len: int) -> int:
    """max_tokens as asked, or all the context the prompt leaves; a request that cannot fit is refused."""
    room = seq_len - prompt_len
    asked = body.max_completion_tokens or body.max_tokens
    if room < 1 or (asked is not None and asked > room):
        raise APIError(400, f"the prompt is {prompt_len} tokens and the model's context is {seq_len}: "
                            f"{max(room, 0)} tokens are left for the reply" + (f", not {asked}" if asked else ""),
                       "max_tokens", "context_length_exceeded")
    return asked or room


def stops(body: Sampling) -> tuple[str, ...]:
    s = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(s) > 4 or any(not x for x in s):
        raise APIError(400, "'stop' takes at most 4 non-empty strings", "stop")
    return tuple(s)


# -- relaying tokens from the device thread -----------------------------------------------------------
class Choices:
    """`body.n` requests for one prompt, queued on the batcher at once (so a full queue is a 503 before any
    response starts); `events()` yields (choice index, event) as they come and cancels whatever is left when
    its consumer stops early (a client that disconnected)."""

    def __init__(self, batcher: Batcher, prompt: list[int], body: Sampling, max_tokens: int):
        loop, self.queue, self.n = asyncio.get_running_loop(), asyncio.Queue(), body.n
        seed = body.seed if body.seed is not None else secrets.randbelow(2**31)

        def emitter(i):
            def emit(event):
                try:
                    loop.call_soon_threadsafe(self.queue.put_nowait, (i, event))
                except RuntimeError:  # the loop is gone (server shutting down)
                    pass
            return emit

        stop = stops(body)
        self.requests = [Request(prompt=prompt, emit=emitter(i), max_tokens=max_tokens, temperature=body.temperature,
                                 top_k=body.top_k, top_p=body.top_p, seed=(seed + i) % 2**32, stop=stop)
                         for i in range(body.n)]
        try:
            for r in self.requests:
                batcher.submit(r)
        except queue.Full:
            self.cancel()
            raise APIError(503, "the server is at capacity; retry shortly", code="overloaded") from None

    def cancel(self) -> None:
        for r in self.requests:
            r.cancel()

    async def events(self):
        open_choices = self.n
        try:
            while open_choices:
                i, event = await self.queue.get()
                if event[0] == "done":
                    open_choices -= 1
                    if event[1] == "error":
                        raise APIError(500, f"generation failed: {event[3]}")
                yield i, event
        finally:
            self.cancel()


def limit_body(app):
    """ASGI wrapper: a body over MAX_BODY_BYTES gets 413, by its Content-Length or while it streams in (then
    the app is told the client left, and whatever it answers is dropped); a body whose next piece takes over
    READ_TIMEOUT_S counts as a client that left."""
    async def wrapped(scope, receive, send):
        if scope["type"] != "http":
            return await app(scope, receive, send)
        too_large = JSONResponse(error_body(f"the body is over {MAX_BODY_BYTES} bytes", "invalid_request_error",
                                            code="body_too_large"), status_code=413)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > MAX_BODY_BYTES:
            return await too_large(scope, receive, send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            try:
                message = await asyncio.wait_for(receive(), READ_TIMEOUT_S)
            except asyncio.TimeoutError:  # a body that trickles in: the client is treated as gone
                return {"type": "http.disconnect"}
            seen += len(message.get("body", b""))
            if seen > MAX_BODY_BYTES:
                refused = True
                await too_large(scope, receive, send)
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        return await app(scope, counted, guarded_send)
    return wrapped


def create_app(batcher: Batcher, tokenizer, model_name: str, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="nanojax", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    app.add_middleware(limit_body)

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return JSONResponse(error_body(str(e), kind, e.param, e.code), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_, e: RequestValidationError):
        first = e.errors()[0]
        # the field's path, without "body" and pydantic's union-member tags ('str', 'list[Part]')
        where = ".".join(str(x) for x in first.get("loc", ()) if isinstance(x, int) or x.isidentifier()
                         and x not in ("body", "str", "int", "float", "bool")) or None
        return JSONResponse(error_body(f"{where or 'body'}: {first.get('msg')}", "invalid_request_error", where),
                            status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(_, e: HTTPException):
        return JSONResponse(error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    async def authorised(request: HTTPRequest):
        if api_key and request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return PAGE.read_text()

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **batcher.load()}

    @app.get("/v1/models", dependencies=[Depends(authorised)])
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "nanojax", "context_length": batcher.seq_len}]}

    async def respond(body: Sampling, prompt: list[int], kind: str):
        max_tokens = budget(body, len(prompt), batcher.seq_len)
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        stream = Choices(batcher, prompt, body, max_tokens).events()
        common = {"id": rid, "created": int(time.time()), "model": model_name}
        if body.stream:
            return EventSourceResponse(sse_chunks(stream, common, kind, body, len(prompt)), ping=15,
                                       send_timeout=30)
        texts, reasons, used = [""] * body.n, [None] * body.n, 0
        async for i, event in stream:
            if event[0] == "text":
                texts[i] += event[1]
            else:
                reasons[i], used = event[1], used + event[2]
        choices = [{"index": i, "finish_reason": reasons[i], "logprobs": None,
                    **({"message": {"role": "assistant", "content": texts[i]}} if kind == "chat"
                       else {"text": texts[i]})} for i in range(body.n)]
        return {**common, "object": "chat.completion" if kind == "chat" else "text_completion", "choices": choices,
                "usage": usage(len(prompt), used)}

    @app.post("/v1/chat/completions", dependencies=[Depends(authorised)])
    async def chat_completions(body: ChatRequest):
        return await respond(body, chat_prompt(tokenizer, body), "chat")

    @app.post("/v1/completions", dependencies=[Depends(authorised)])
    async def completions(body: CompletionRequest):
        return await respond(body, tokenizer.encode(body.prompt, prepend=tokenizer.bos_token_id), "text")

    return app


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


async def sse_chunks(stream, common: dict, kind: str, body: Sampling, prompt_len: int):
    """OpenAI's streaming chunks: the role first (chat), then text deltas, a chunk with each choice's
    finish_reason, the usage chunk when asked for, and `[DONE]`."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(i, delta=None, finish=None):
        payload = {"delta": delta or {}} if kind == "chat" else {"text": (delta or {}).get("content", "")}
        return {"data": json.dumps({**common, "object": obj, "choices": [
            {"index": i, **payload, "finish_reason": finish, "logprobs": None}]})}

    if kind == "chat":
        for i in range(body.n):
            yield chunk(i, {"role": "assistant", "content": ""})
    used = 0
    async for i, event in stream:
        if event[0] == "text":
            yield chunk(i, {"content": event[1]})
        else:
            used += event[2]
            yield chunk(i, finish=event[1])
    if (body.stream_options or {}).get("include_usage"):
        yield {"data": json.dumps({**common, "object": obj, "choices": [], "usage": usage(prompt_len, used)})}
    yield {"data": "[DONE]"}


class TimelyH11(H11Protocol):
    """uvicorn's HTTP/1.1 protocol, which also closes a connection that has not sent a whole request head within
    READ_TIMEOUT_S of opening (uvicorn times out only idle kept-alive connections), so stalled or trickling
    clients cannot pile up; together with MAX_CONNECTIONS they cost a socket for seconds, never a slot."""

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.loop.call_later(READ_TIMEOUT_S, self._close_if_no_request)

    def _close_if_no_request(self) -> None:
        if self.cycle is None and not self.transport.is_closing():  # no request head has arrived
            self.transport.close()


def uvicorn_config(app, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", http=TimelyH11,
                          timeout_keep_alive=int(READ_TIMEOUT_S), limit_concurrency=MAX_CONNECTIONS)


class ServerThread:
    """uvicorn serving `app` on a thread at 127.0.0.1 (a free port unless given): tests and `bench serve`."""

    def __init__(self, app, port: int = 0):
        port = port or self.free_port()
        self.server = uvicorn.Server(uvicorn_config(app, "127.0.0.1", port))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on 127.0.0.1:{port}")
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{port}"

    @staticmethod
    def free_port() -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def main(argv=None):
    from nanojax.chat_session import add_model_arguments
    from nanojax.checkpoint import load_model
    from nanojax.console import quiet_library_logs

    ap = argparse.ArgumentParser(prog="python -m nanojax.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 serves the network (set --api-key)")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--slots", type=int, default=16, help="requests decoded together (KV-cache rows)")
    ap.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY'")
    ap.add_argument("--name", default=None, help="model id in the API (default: the run's name)")
    args = ap.parse_args(argv)
    quiet_library_logs()
    try:
        model, tokenizer, config = load_model(args.run_dir, args.step)
    except (FileNotFoundError, ValueError) as e:
        ap.exit(2, f"error: {e}\n")
    if tokenizer is None:
        ap.exit(2, f"error: {args.run_dir} records no tokenizer that exists here\n")
    batcher = Batcher(model, tokenizer, slots=args.slots)
    app = create_app(batcher, tokenizer, args.name or config.run_name, args.api_key)
    print(f"serving {config.run_name} on http://{args.host}:{args.port} ({args.slots} slots)", flush=True)
    try:
        uvicorn.Server(uvicorn_config(app, args.host, args.port)).run()
    finally:
        batcher.close()


if __name__ == "__main__":
    sys.exit(main())
