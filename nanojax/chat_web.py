"""Chat with a model in the browser: a small HTTP server with a streaming API and one static page.

    python -m nanojax.chat_web RUN_DIR [--step N] [--host 127.0.0.1] [--port 8000]

Routes: `GET /` (the page), `GET /health`, `POST /chat/completions` with
`{"messages": [{"role": "user"|"assistant"|"system", "content": str}], "temperature"?, "top_k"?, "max_tokens"?}`
answered as server-sent events `data: {"token": "..."}` … `data: {"done": true}` (or `data: {"error": ...}`).
One model, one generation at a time (a lock); the standard library's threading server, no extra packages.
Listens on 127.0.0.1 by default: pass `--host 0.0.0.0` to serve a network, knowing there is no authentication.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from nanojax.chat_session import add_model_arguments, session_from_args

LIMITS = {"messages": 500, "chars_per_message": 8000, "chars_total": 32000, "temperature": (0.0, 2.0),
          "top_k": (0, 200), "max_tokens": (1, 4096)}
DEFAULTS = {"temperature": 0.8, "top_k": 50, "max_tokens": 512}
PAGE = pathlib.Path(__file__).parent / "static" / "chat.html"


class BadRequest(ValueError):
    pass


def validate(body) -> tuple[list[dict], dict]:
    """(messages, sampling options) from a request body, or BadRequest naming the offending field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list")
    if len(messages) > LIMITS["messages"]:
        raise BadRequest(f"'messages' has {len(messages)} entries; at most {LIMITS['messages']}")
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant", "system"):
            raise BadRequest(f"messages[{i}].role must be 'user', 'assistant' or 'system'")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise BadRequest(f"messages[{i}].content must be a non-empty string")
        if len(m["content"]) > LIMITS["chars_per_message"]:
            raise BadRequest(f"messages[{i}].content has {len(m['content'])} characters; "
                             f"at most {LIMITS['chars_per_message']}")
        total += len(m["content"])
    if total > LIMITS["chars_total"]:
        raise BadRequest(f"the conversation has {total} characters; at most {LIMITS['chars_total']}")
    options = {}
    for key, default in DEFAULTS.items():
        value = body.get(key, default)
        lo, hi = LIMITS[key]
        kind = float if key == "temperature" else int
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi or \
                (kind is int and value != int(value)):
            raise BadRequest(f"'{key}' must be a {kind.__name__} in [{lo}, {hi}], got {value!r}")
        options[key] = kind(value)
    return [{"role": m["role"], "content": m["content"]} for m in messages], options


def make_handler(session, lock: threading.Lock, name: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):  # one line per request on stderr, like nanochat's log
            sys.stderr.write(f"[chat_web] {self.address_string()} {fmt % args}\n")

        def _send(self, code: int, body: bytes, ctype: str):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path in ("/", "/index.html"):
                self._send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif self.path == "/health":
                self._send(200, json.dumps({"status": "ok", "model": name}).encode(), "application/json")
            else:
                self._send(404, b'{"error": "not found"}', "application/json")

        def do_POST(self):
            if self.path != "/chat/completions":
                return self._send(404, b'{"error": "not found"}', "application/json")
            try:
                length = int(self.headers.get("Content-Length", "0"))
                if length > 1_000_000:
                    raise BadRequest("request body over 1 MB")
                messages, options = validate(json.loads(self.rfile.read(length) or b"null"))
                if messages[-1]["role"] != "user":
                    raise BadRequest("the last message must be from the user")
            except (BadRequest, json.JSONDecodeError, ValueError) as e:
                return self._send(400, json.dumps({"error": str(e)}).encode(), "application/json")
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()

            def event(obj):
                self.wfile.write(f"data: {json.dumps(obj)}\n\n".encode())
                self.wfile.flush()

            try:
                with lock:
                    for piece in session.stream(messages, **options):
                        event({"token": piece})
                event({"done": True})
            except ValueError as e:  # e.g. the conversation does not fit the context
                event({"error": str(e)})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client went away; the lock is released and the next request proceeds
            self.close_connection = True

    return Handler


def serve(session, host: str = "127.0.0.1", port: int = 8000, name: str = "nanojax") -> ThreadingHTTPServer:
    """A started-but-not-serving server (call .serve_forever(); port 0 picks a free port)."""
    return ThreadingHTTPServer((host, port), make_handler(session, threading.Lock(), name))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanojax.chat_web", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    args = ap.parse_args(argv)
    session = session_from_args(args)
    if session is None:
        return 2
    server = serve(session, args.host, args.port, name=pathlib.Path(args.run_dir).name)
    print(f"nanojax chat: http://{args.host}:{server.server_address[1]}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
