"""HumanEval (openai/openai_humaneval, 164 problems, split test): write a Python function.

Column layout: task_id, prompt, canonical_solution, test, entry_point. The user message is the prompt
(signature + docstring); the reference assistant reply is prompt + solution. `evaluate` takes the first
```python (or bare ```) block of the completion, else the whole reply, prepends the prompt's import lines,
appends the tests and `check(entry_point)`, and runs it in `nanojax.execution` (5 s timeout): a pass is
an exit without error, as nanochat.
"""
from __future__ import annotations

import re

from nanojax.execution import execute
from nanojax.tasks.common import DatasetTask

CODE_BLOCK_RE = re.compile(r"```(?:python)?\s*\n(.*?)\n```", re.DOTALL)


def extract_imports(prompt: str) -> str:
    """The import lines at the top of a prompt (stops at the first other non-comment line)."""
    imports = []
    for line in prompt.split("\n"):
        stripped = line.strip()
        if stripped.startswith(("import ", "from ")):
            imports.append(stripped)
        elif stripped and not stripped.startswith("#"):
            break
    return "\n".join(imports)


def extract_program(completion: str) -> str:
    blocks = CODE_BLOCK_RE.findall(completion)
    return (blocks[0] if blocks else completion).strip()


class HumanEval(DatasetTask):
    dataset = "openai/openai_humaneval"
    hub_subset = "openai_humaneval"  # the repo keeps openai_humaneval/test-00000-of-00001.parquet
    columns = ("prompt", "canonical_solution", "test", "entry_point")
    splits = ("test",)

    def make_conversation(self, row) -> dict:
        return {
            "messages": [{"role": "user", "content": row["prompt"]},
                         {"role": "assistant", "content": f"{row['prompt']}\n{row['canonical_solution']}"}],
            "entry_point": row["entry_point"],
            "test": row["test"],
        }

    def program(self, conversation, completion: str) -> str:
        imports = extract_imports(conversation["messages"][0]["content"])
        return (f"{imports}\n\n{extract_program(completion)}\n\n{conversation['test']}\n"
                f"check({conversation['entry_point']})")

    def evaluate(self, conversation, completion: str, timeout: float = 5.0) -> bool:
        return bool(execute(self.program(conversation, completion), timeout=timeout).success)
