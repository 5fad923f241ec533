"""The data pipelines a config can name (`config.data.kind`) and the old spellings that still load."""
from __future__ import annotations

import difflib

KINDS = ("synthetic", "fineweb", "mid", "sft", "rl")
# task mixtures of conversations (nanojax.data.chat); rl samples replies to them instead (nanojax.rl)
CONVERSATION_KINDS = ("mid", "sft", "rl")
EPOCH_KINDS = ("mid", "sft")  # train.num_iterations=-1 means one epoch of the train mixture (counted at start)
ALIASES = {"chat": "sft"}  # SFT's name until the rename: old run configs and checkpoints keep working


def canonical_kind(kind: str) -> str:
    """`kind` with an old spelling replaced by its current name; ValueError for a kind no pipeline reads."""
    kind = ALIASES.get(kind, kind)
    if kind not in KINDS:
        close = difflib.get_close_matches(str(kind), [*KINDS, *ALIASES], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        aliases = ", ".join(f"{old} = {new}" for old, new in ALIASES.items())
        raise ValueError(f"config.data.kind={kind!r} is not a known data pipeline{hint} (known: {', '.join(KINDS)}; "
                         f"old names: {aliases})")
    return kind
