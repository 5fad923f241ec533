"""What the terminal and web chats share: load a chat model, fit a conversation into the context, stream text.

The conversation is kept as messages and re-rendered with `render_for_completion` each turn, so what the
model sees is exactly what SFT trained on. When the history no longer fits `model.seq_len` together with the
reply budget, the oldest user/assistant pairs are dropped (and the caller is told) instead of crashing
(nanochat issue #581). Without an explicit reply budget, `plan` gives the reply what the context has left after
the prompt (at most DEFAULT_MAX_TOKENS), so a request without max_tokens fits any model; an explicit budget that
cannot fit even with the last message alone is a ValueError naming the numbers.
"""
from __future__ import annotations

import sys
from typing import Iterator

from nanojax.checkpoint import load_model
from nanojax.console import quiet_library_logs
from nanojax.engine import Engine

PLACEHOLDER = {"role": "assistant", "content": "…"}  # dropped again by render_for_completion
DEFAULT_MAX_TOKENS = 512  # reply budget when the caller gives none (less if the context has less room)


class ChatSession:
    def __init__(self, model, tokenizer, *, use_tool: bool = True):
        if tokenizer is None:
            raise ValueError("this run has no tokenizer recorded in its checkpoint metadata; chat needs one "
                             "(train with data.kind=fineweb/mid/sft, which records data.tokenizer_dir)")
        self.model, self.tokenizer = model, tokenizer
        self.engine = Engine(model, tokenizer, use_tool=use_tool)
        self.seq_len = int(model.cfg.seq_len)
        self.finish_reason = None  # of the last reply: "stop" (the model ended it) or "length" (max_tokens ran out)

    def prompt(self, messages: list[dict], max_new_tokens: int) -> tuple[list[int], int]:
        """(prompt ids, number of leading messages dropped to make room for `max_new_tokens`)."""
        if not messages or messages[-1].get("role") != "user":
            raise ValueError("the conversation must end with a user message")
        if max_new_tokens < 1:
            raise ValueError(f"max_tokens={max_new_tokens}: the reply needs at least 1 token")
        dropped = 0
        system = [m for m in messages[:1] if m.get("role") == "system"]
        turns = messages[len(system):]
        while True:
            ids = self.tokenizer.render_for_completion({"messages": system + turns + [PLACEHOLDER]},
                                                       max_tokens=10**9)
            if len(ids) + max_new_tokens <= self.seq_len:
                return ids, dropped
            if len(turns) <= 1:
                room = self.seq_len - len(ids)
                advice = f"ask for at most {room}" if room >= 1 else "shorten the message"
                raise ValueError(f"max_tokens={max_new_tokens} does not fit: the model's context is {self.seq_len} "
                                 f"tokens and the prompt (the last message alone) takes {len(ids)}, leaving "
                                 f"{max(room, 0)} for the reply; {advice}")
            turns = turns[2:]  # drop the oldest user/assistant pair
            dropped += 2

    def plan(self, messages: list[dict], max_tokens: int | None = None) -> tuple[list[int], int, int]:
        """(prompt ids, leading messages dropped, reply budget).

        max_tokens=None: min(DEFAULT_MAX_TOKENS, what the context has left after the prompt); the oldest turns are
        dropped only as far as needed to leave min(DEFAULT_MAX_TOKENS, seq_len // 8) tokens for the reply.
        An explicit max_tokens drops the oldest turns to make room, or raises ValueError naming the numbers."""
        if max_tokens is None:
            floor = max(1, min(DEFAULT_MAX_TOKENS, self.seq_len // 8))
            ids, dropped = self.prompt(messages, floor)
            return ids, dropped, min(DEFAULT_MAX_TOKENS, self.seq_len - len(ids))
        ids, dropped = self.prompt(messages, max_tokens)
        return ids, dropped, max_tokens

    def stream(self, messages: list[dict], *, temperature: float = 0.6, top_k: int = 50,
               max_tokens: int | None = 256, seed: int = 42) -> Iterator[str]:
        """Text of the assistant's reply, piece by piece (never splitting a UTF-8 character).
        max_tokens=None: the default budget of `plan`."""
        ids, _, max_tokens = self.plan(messages, max_tokens)
        out: list[int] = []
        shown = ""
        self.finish_reason = "length"
        for column, _ in self.engine.generate(ids, num_samples=1, max_tokens=max_tokens,
                                              temperature=temperature, top_k=top_k, seed=seed):
            tok = column[0]
            if tok in self.engine.stop_tokens:
                self.finish_reason = "stop"
                break
            out.append(tok)
            text = self.tokenizer.decode(out)
            if text.endswith("\ufffd"):
                continue
            yield text[len(shown):]
            shown = text
        text = self.tokenizer.decode(out)
        if len(text) > len(shown):
            yield text[len(shown):]


def load_session(run_dir: str, step: int | None = None) -> ChatSession:
    model, tokenizer, _ = load_model(run_dir, step)
    return ChatSession(model, tokenizer)


def add_model_arguments(ap) -> None:
    """The arguments every chat front end takes to find its model."""
    ap.add_argument("run_dir", help="a run directory (e.g. $NANOJAX_HOME/runs/chat_d20) or checkpoint")
    ap.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")


def session_from_args(args) -> ChatSession | None:
    """The session for parsed `add_model_arguments`, or None after printing why it cannot be loaded."""
    quiet_library_logs()
    try:
        return load_session(args.run_dir, args.step)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return None
