"""MMLU (cais/mmlu): 4-way multiple choice. Subset `auxiliary_train` (split train, ~100K rows drawn from
ARC, MC_TEST, OBQA, RACE: used for midtraining) or `all` (splits test 14,042 / validation / dev: eval).

Column layout: question, subject, choices (4 strings), answer (0-3). The auxiliary_train parquet wraps
each row in a `train` struct column; both layouts are read.
"""
from __future__ import annotations

from nanojax.tasks.common import BadRowError, DatasetTask, render_mc


class MMLU(DatasetTask):
    dataset = "cais/mmlu"
    letters = ("A", "B", "C", "D")
    splits = ("train", "validation", "dev", "test")
    subsets = ("all", "auxiliary_train")
    eval_type = "categorical"

    def check_split(self, split: str, subset: str | None) -> None:
        super().check_split(split, subset)
        if subset == "auxiliary_train" and split != "train":
            raise ValueError("MMLU subset auxiliary_train has only the split 'train'")
        if subset == "all" and split == "train":
            raise ValueError("MMLU subset 'all' has no 'train' split (use subset='auxiliary_train')")

    def make_conversation(self, row) -> dict:
        if "train" in row and isinstance(row["train"], dict):
            row = row["train"]
        choices, answer = row["choices"], row["answer"]
        if len(choices) != 4 or not 0 <= int(answer) < 4:
            raise BadRowError(f"{self.name} split {self.split!r}: expected 4 choices and an answer 0-3, got "
                              f"{len(choices)} choices and answer {answer!r}")
        return {
            "messages": [{"role": "user", "content": render_mc(row["question"], self.letters, choices)},
                         {"role": "assistant", "content": self.letters[int(answer)]}],
            "subject": row.get("subject", ""),
            "letters": self.letters,
        }

    def evaluate(self, conversation, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]
