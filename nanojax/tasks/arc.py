"""ARC (allenai/ai2_arc), subsets ARC-Easy (2,251 train / 570 validation / 2,376 test) and ARC-Challenge
(1,119 / 299 / 1,172): multiple choice with 3-5 options labelled A-E (a few use 1-4).

Column layout: id, question, choices {"text": [...], "label": [...]}, answerKey.
"""
from __future__ import annotations

from nanojax.tasks.common import BadRowError, DatasetTask, render_mc


class ARC(DatasetTask):
    dataset = "allenai/ai2_arc"
    columns = ("question", "choices", "answerKey")
    splits = ("train", "validation", "test")
    subsets = ("ARC-Easy", "ARC-Challenge")
    eval_type = "categorical"

    def make_conversation(self, row) -> dict:
        letters, texts, answer = list(row["choices"]["label"]), list(row["choices"]["text"]), row["answerKey"]
        if answer not in letters or len(letters) != len(texts):
            raise BadRowError(f"{self.name} split {self.split!r}: answer {answer!r} is not one of {letters}")
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], letters, texts)},
                         {"role": "assistant", "content": answer}],
            "letters": letters,
        }

    def evaluate(self, conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
