"""nanochat's conversation format and its one validator, shared by rendering (tokenizer) and datasets (tasks).

A conversation is `{"messages": [...]}`: an optional leading system message, then user and assistant messages
alternating, starting with the user. Each message is `{"role", "content"}` with a non-empty str content; an
assistant message may instead hold a non-empty list of parts `{"type": "text"|"python"|"python_output",
"text": str}` (its text, a calculator call, the tool's reply), not all of them empty. Rendering also takes
a conversation that ends with the user (a prompt); dataset examples must hold a complete exchange.

Whitespace-only content is valid, as in nanochat: a model's blank reply stays renderable chat history.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

PART_TYPES = ("text", "python", "python_output")


def messages_of(conversation: Mapping[str, Any]) -> Sequence[Mapping[str, Any]]:
    """The non-empty 'messages' list, each a dict with 'role' and 'content'; ValueError otherwise."""
    messages = conversation.get("messages") if isinstance(conversation, Mapping) else None
    if not isinstance(messages, (list, tuple)):
        keys = f" with keys {sorted(conversation)}" if isinstance(conversation, Mapping) else ""
        raise ValueError(f"a conversation is a dict with a 'messages' list, got "
                         f"{type(conversation).__name__}{keys}")
    if not messages:
        raise ValueError("conversation has no messages")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise ValueError(f"message {i} must be a dict with 'role' and 'content', got {message!r:.100}")
    return messages


def validate(conversation: Mapping[str, Any], *, complete: bool = False) -> list[tuple[int, str, Any]]:
    """(index in the messages list, role, content) per turn, the system message merged into the first user
    message (`system + "\\n\\n" + user`, as nanochat renders it), or a ValueError naming the message (and
    part) index and the problem, so one bad row in a 500k-row mixture is easy to find.

    complete=True (dataset examples) also requires at least one user and one assistant message.
    """
    messages = messages_of(conversation)
    for i, message in enumerate(messages):
        _check_content(i, message["role"], message["content"])
    turns = [(i, m["role"], m["content"]) for i, m in enumerate(messages)]
    if turns[0][1] == "system":
        if len(turns) < 2 or turns[1][1] != "user":
            got = "nothing" if len(turns) < 2 else f"role {turns[1][1]!r}"
            raise ValueError(f"message 0 is a system message, so message 1 must be from the user, got {got}")
        turns = [(1, "user", turns[0][2] + "\n\n" + turns[1][2])] + turns[2:]
    for position, (i, role, _) in enumerate(turns):
        expected = "user" if position % 2 == 0 else "assistant"
        if role != expected:
            raise ValueError(f"message {i} has role {role!r} but should be {expected!r}: after an optional "
                             "leading system message, roles alternate user, assistant, user, ...")
    if complete and len(turns) < 2:
        after = " after the system message" if len(turns) < len(messages) else ""
        raise ValueError(f"needs at least one user and one assistant message, got {len(turns)} message{after}")
    return turns


def _check_content(i: int, role: Any, content: Any) -> None:
    if isinstance(content, str):
        if not content:
            raise ValueError(f"message {i} ({role}) has empty content")
    elif role != "assistant":
        raise ValueError(f"message {i} ({role}) content must be a str, got {type(content).__name__} "
                         "(only assistant messages have parts)")
    elif not isinstance(content, (list, tuple)):
        raise ValueError(f"message {i} (assistant) content must be a str or a list of parts, "
                         f"got {type(content).__name__}")
    elif not content:
        raise ValueError(f"message {i} (assistant) has an empty list of parts")
    else:
        for j, part in enumerate(content):
            if not isinstance(part, Mapping) or not isinstance(part.get("text"), str):
                raise ValueError(f"message {i}, part {j}: a part is a dict with 'type' and a str 'text', "
                                 f"got {part!r:.100}")
            if part.get("type") not in PART_TYPES:
                raise ValueError(f"message {i}, part {j}: unknown part type {part.get('type')!r} "
                                 f"(expected one of {', '.join(PART_TYPES)})")
        if not any(part["text"] for part in content):
            raise ValueError(f"message {i} (assistant) has only empty parts")
