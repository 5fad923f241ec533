"""SmolTalk (HuggingFaceTB/smol-smoltalk): general multi-turn conversations, 460K train / 24K test rows.

Column layout: `messages` = list of {"role", "content"} with an optional leading system message.
"""
from __future__ import annotations

from nanojax.tasks.common import BadRowError, DatasetTask


class SmolTalk(DatasetTask):
    dataset = "HuggingFaceTB/smol-smoltalk"
    columns = ("messages",)
    splits = ("train", "test")
    default_split = "train"

    def make_conversation(self, row) -> dict:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise BadRowError(f"{self.name} split {self.split!r}: 'messages' is {type(messages).__name__}")
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
