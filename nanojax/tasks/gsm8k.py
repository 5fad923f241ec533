"""GSM8K (openai/gsm8k, subset main: 7,473 train / 1,319 test; or socratic): grade-school maths.

Column layout: question, answer. The answer's calculator spans `<<expr=result>>` become a `python` part
(expr: the model learns to call the tool) and a `python_output` part (result: the tool's reply, not
trained on); the text between them stays `text` parts and the final `#### N` line is kept, as nanochat.
`evaluate` extracts `#### (-?[0-9.,]+)` from both the completion and the reference, strips commas and
compares the strings (OpenAI's grade-school-math normalisation).
"""
from __future__ import annotations

import re

from nanojax.tasks.common import BadRowError, DatasetTask

ANSWER_RE = re.compile(r"#### (\-?[0-9\.\,]+)")
CALC_RE = re.compile(r"(<<[^>]+>>)")


def extract_answer(text: str) -> str | None:
    match = ANSWER_RE.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def answer_parts(answer: str) -> list[dict]:
    """The assistant parts of a GSM8K answer: text, python (expr), python_output (result), ..."""
    parts = []
    for piece in CALC_RE.split(answer):
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            expr, result = inner.rsplit("=", 1) if "=" in inner else (inner, "")
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


class GSM8K(DatasetTask):
    dataset = "openai/gsm8k"
    columns = ("question", "answer")
    splits = ("train", "test")
    subsets = ("main", "socratic")
    answer_format = "'#### N'"

    def make_conversation(self, row) -> dict:
        question, answer = row["question"], row["answer"]
        if not isinstance(answer, str) or extract_answer(answer) is None:
            raise BadRowError(f"{self.name} split {self.split!r}: the answer has no '#### <number>' line")
        return {"messages": [{"role": "user", "content": question},
                             {"role": "assistant", "content": answer_parts(answer)}]}

    def evaluate(self, conversation, completion: str) -> bool:
        reference = conversation["messages"][-1]["content"]
        ref_text = reference[-1]["text"] if isinstance(reference, list) else reference
        ref = extract_answer(ref_text)
        pred = extract_answer(completion)
        return pred is not None and pred == ref

    def well_formed(self, completion: str) -> bool:
        return extract_answer(completion) is not None
