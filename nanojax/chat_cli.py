"""Chat with a model in the terminal.

    python -m nanojax.chat_cli RUN_DIR [--step N] [--temperature 0.6] [--top-k 50] [--max-tokens 256]
    python -m nanojax.chat_cli RUN_DIR -p "Why is the sky blue?"        # one prompt, one reply, exit

Commands: `clear` starts a new conversation, `quit` / `exit` (or Ctrl-D) leaves.
"""
from __future__ import annotations

import argparse
import sys

from nanojax.chat_session import add_model_arguments, session_from_args


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nanojax.chat_cli", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    ap.add_argument("--system", default=None, help="a system message (merged into the first user turn)")
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--top-k", type=int, default=50)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args(argv)

    session = session_from_args(args)
    if session is None:
        return 2
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages: list[dict] = list(system)
    interactive = args.prompt is None
    if interactive:
        print(f"nanojax chat ({args.run_dir}); 'clear' for a new conversation, 'quit' to leave")
    seed = args.seed
    while True:
        if interactive:
            try:
                text = input("\nUser: ").strip()
            except (EOFError, KeyboardInterrupt):
                print()
                return 0
            if text in ("quit", "exit"):
                return 0
            if text == "clear":
                messages = list(system)
                print("(new conversation)")
                continue
            if not text:
                continue
        else:
            text = args.prompt
        messages.append({"role": "user", "content": text})
        try:
            _, dropped = session.prompt(messages, args.max_tokens)
            if dropped:
                messages = system + messages[len(system) + dropped:]
                print(f"(the oldest {dropped} messages no longer fit the context and were dropped)")
            print("\nAssistant: ", end="", flush=True)
            reply = []
            for piece in session.stream(messages, temperature=args.temperature, top_k=args.top_k,
                                        max_tokens=args.max_tokens, seed=seed):
                reply.append(piece)
                print(piece, end="", flush=True)
            print()
            if session.finish_reason == "length":
                print(f"(reply cut at --max-tokens {args.max_tokens})")
            elif not interactive:
                print("(the model ended its reply with <|assistant_end|>)")
        except ValueError as e:
            messages.pop()
            print(f"error: {e}", file=sys.stderr)
            if not interactive:
                return 2
            continue
        seed += 1
        messages.append({"role": "assistant", "content": "".join(reply) or " "})
        if not interactive:
            return 0


if __name__ == "__main__":
    sys.exit(main())
