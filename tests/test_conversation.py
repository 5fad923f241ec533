"""The one conversation validator: what rendering accepts, what dataset examples additionally need."""
import json

import pytest

from nanojax.conversation import validate
from nanojax.tasks.common import BadRowError
from nanojax.tasks.smoltalk import SmolTalk
from nanojax.tokenizer import Tokenizer


def _msgs(*pairs):
    return {"messages": [{"role": r, "content": c} for r, c in pairs]}


def test_turns_merge_the_system_message_and_keep_indices():
    conv = _msgs(("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello"), ("user", "Bye"))
    assert validate(conv) == [(1, "user", "Be brief.\n\nHi"), (2, "assistant", "Hello"), (3, "user", "Bye")]


@pytest.mark.parametrize("conversation, error", [
    (_msgs(("user", "a")), "got 1 message$"),
    (_msgs(("system", "s"), ("user", "a")), "got 1 message after the system message"),
])
def test_complete_needs_a_user_and_an_assistant_message(conversation, error):
    validate(conversation)  # a prompt: fine for rendering
    with pytest.raises(ValueError, match="needs at least one user and one assistant message, " + error):
        validate(conversation, complete=True)


def test_blank_content_rule_is_the_same_everywhere():
    """Whitespace-only text is content (nanochat keeps it; a model's blank reply stays chat history), "" is not,
    and a list of parts needs one non-empty part."""
    assert validate(_msgs(("user", " "), ("assistant", "\n")), complete=True)[1] == (1, "assistant", "\n")
    parts = [{"type": "text", "text": ""}, {"type": "python", "text": "1+1"}, {"type": "python_output", "text": ""}]
    validate(_msgs(("user", "a"), ("assistant", parts)), complete=True)
    empty = [{"type": "text", "text": ""}, {"type": "python_output", "text": ""}]
    with pytest.raises(ValueError, match=r"message 1 \(assistant\) has only empty parts"):
        validate(_msgs(("user", "a"), ("assistant", empty)))


def test_tokenizer_and_tasks_report_the_same_problem(tmp_path):
    tok = Tokenizer.from_ranks({bytes([i]): i for i in range(256)})
    bad, prompt = _msgs(("user", "a"), ("user", "b")), _msgs(("user", "a"))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in (bad, prompt)))
    task = SmolTalk(split="train", source=tmp_path, shuffle_seed=None)
    with pytest.raises(ValueError) as rendering:
        tok.render_conversation(bad)
    with pytest.raises(BadRowError) as dataset:
        task[0]
    assert str(dataset.value) == f"HuggingFaceTB/smol-smoltalk split 'train' row 0: {rendering.value}"
    assert "message 1 has role 'user' but should be 'assistant'" in str(rendering.value)
    tok.render_conversation(prompt)  # a prompt renders, but is no dataset example
    with pytest.raises(BadRowError, match="row 1: needs at least one user and one assistant message"):
        task[1]
