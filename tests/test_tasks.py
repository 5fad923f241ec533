"""Tasks: loaders on small parquet files in each dataset's own layout, GSM8K on the real test set, mixtures."""
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from nanojax.tasks.arc import ARC
from nanojax.tasks.common import BadRowError, Task, TaskMixture, render_mc
from nanojax.tasks.gsm8k import GSM8K, answer_parts, extract_answer
from nanojax.tasks.humaneval import HumanEval, extract_imports, extract_program
from nanojax.tasks.mmlu import MMLU
from nanojax.tasks.registry import (EVAL_TASKS, TASKS, build_task, eval_name, eval_task, parse_mixture, parse_sources,
                                    resolve, source_for)
from nanojax.tasks.smoltalk import SmolTalk


def _write(path, rows, schema=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def _smoltalk_rows(n):
    rows = []
    for i in range(n):
        msgs = [{"content": f"You are helpful {i}", "role": "system"}] if i % 3 == 0 else []
        msgs += [{"content": f"hello {i}", "role": "user"}, {"content": f"hi there {i}", "role": "assistant"},
                 {"content": f"more {i}", "role": "user"}, {"content": f"sure {i}", "role": "assistant"}]
        rows.append({"messages": msgs, "source": "everyday-conversations"})
    return rows


class _Numbers(Task):
    def __init__(self, n, tag, **kw):
        super().__init__(**kw)
        self.n, self.tag = n, tag

    def num_examples(self):
        return self.n

    def get_example(self, i):
        return {"messages": [{"role": "user", "content": f"{self.tag}{i}"}, {"role": "assistant", "content": "ok"}]}


def test_render_mc_is_nanochats_format():
    got = render_mc("What is 2+2?", ["A", "B", "C"], ["3", "4", "5"])
    assert got == ("Multiple Choice question: What is 2+2?\n- 3=A\n- 4=B\n- 5=C\n"
                   "\nRespond only with the letter of the correct answer.")


def test_slicing_and_mixture_match_nanochat():
    t = _Numbers(10, "a", start=2, stop=9, step=3)
    assert len(t) == 3 and [c["messages"][0]["content"] for c in t] == ["a2", "a5", "a8"]
    assert t[-1]["messages"][0]["content"] == "a8"
    with pytest.raises(IndexError):
        t[3]
    assert len(_Numbers(5, "a", start=5)) == 0
    with pytest.raises(ValueError):
        _Numbers(5, "a", start=3, stop=2)
    tasks = [_Numbers(7, "a"), _Numbers(5, "b"), _Numbers(3, "c")]
    mix = TaskMixture(tasks)
    # nanochat: list of (task, local) pairs in task order, random.Random(42).shuffle
    pairs = [(t, i) for t, n in enumerate([7, 5, 3]) for i in range(n)]
    random.Random(42).shuffle(pairs)
    assert len(mix) == 15
    assert [mix[i]["messages"][0]["content"] for i in range(15)] == ["abc"[t] + str(i) for t, i in pairs]
    assert [mix.locate(i) for i in range(15)] == pairs


def test_smoltalk_parquet_layout_shuffle_and_split_files(tmp_path):
    rows = _smoltalk_rows(30)
    _write(tmp_path / "data" / "train-00000-of-00002.parquet", rows[:20])
    _write(tmp_path / "data" / "train-00001-of-00002.parquet", rows[20:])
    _write(tmp_path / "data" / "test-00000-of-00001.parquet", _smoltalk_rows(4))
    task = SmolTalk(split="train", source=tmp_path)
    assert len(task) == 30 and task.eval_type == "generative"
    perm = np.random.default_rng(42).permutation(30)  # = Hugging Face datasets .shuffle(seed=42)
    assert task[0]["messages"][-1]["content"] == f"sure {perm[0]}"
    assert task.row_of(5) == perm[5]
    assert len(SmolTalk(split="test", source=tmp_path)) == 4
    unshuffled = SmolTalk(split="train", source=tmp_path, shuffle_seed=None, start=10, stop=20)
    assert len(unshuffled) == 10 and unshuffled[0]["messages"][0]["content"] == "hello 10"


def test_bad_rows_name_dataset_split_and_row_or_are_skipped(tmp_path):
    rows = _smoltalk_rows(6)
    rows[2]["messages"][-1]["content"] = ""  # empty content
    rows[4]["messages"] = rows[4]["messages"][::-1]  # role order
    path = tmp_path / "train.parquet"
    _write(path, rows)
    task = SmolTalk(split="train", source=path, shuffle_seed=None)
    where = r"HuggingFaceTB/smol-smoltalk split 'train' row 2: "
    with pytest.raises(BadRowError, match=where + r"message \d \(assistant\) has empty content"):
        task[2]
    with pytest.raises(BadRowError, match=r"row 4: message 0 has role 'assistant' but should be 'user'"):
        task[4]
    assert task[1]["messages"][0]["content"] == "hello 1"
    skipping = SmolTalk(split="train", source=path, skip_bad_rows=True)
    assert len(skipping) == 4 and skipping.num_skipped == 2
    assert sorted(skipping.row_of(i) for i in range(4)) == [0, 1, 3, 5]


def test_mmlu_both_layouts(tmp_path):
    row = {"question": "Q?", "subject": "anatomy", "choices": ["w", "x", "y", "z"], "answer": 2}
    _write(tmp_path / "all" / "test-00000-of-00001.parquet", [dict(row, question=f"Q{i}?") for i in range(5)])
    _write(tmp_path / "all" / "auxiliary_train-00000-of-00001.parquet", [row])  # must not be picked as 'train'
    _write(tmp_path / "auxiliary_train" / "train-00000-of-00001.parquet", [{"train": dict(row, subject="")}] * 3)
    test = MMLU(subset="all", split="test", source=tmp_path)
    assert len(test) == 5 and test.eval_type == "categorical" and test.letters == ("A", "B", "C", "D")
    conv = test[0]
    assert conv["messages"][0]["content"].startswith("Multiple Choice question: Q")
    assert "- y=C\n" in conv["messages"][0]["content"] and conv["messages"][1]["content"] == "C"
    assert conv["letters"] == ("A", "B", "C", "D") and conv["subject"] == "anatomy"
    assert test.evaluate(conv, "C") and not test.evaluate(conv, "A")
    aux = MMLU(subset="auxiliary_train", split="train", source=tmp_path)
    assert len(aux) == 3 and aux[0]["messages"][1]["content"] == "C"
    with pytest.raises(ValueError, match="auxiliary_train has only the split 'train'"):
        MMLU(subset="auxiliary_train", split="test", source=tmp_path)


def test_arc_layout(tmp_path):
    rows = [{"id": f"q{i}", "question": f"Which {i}?",
             "choices": {"text": ["red", "green", "blue"], "label": ["A", "B", "C"]}, "answerKey": "B"}
            for i in range(4)]
    rows[3]["choices"] = {"text": ["one", "two", "three", "four"], "label": ["1", "2", "3", "4"]}
    rows[3]["answerKey"] = "4"
    _write(tmp_path / "ARC-Easy" / "train-00000-of-00001.parquet", rows)
    _write(tmp_path / "ARC-Challenge" / "train-00000-of-00001.parquet", rows[:1])
    easy = ARC(subset="ARC-Easy", split="train", source=tmp_path, shuffle_seed=None)
    assert len(easy) == 4 and len(ARC(subset="ARC-Challenge", split="train", source=tmp_path)) == 1
    conv = easy[0]
    assert conv["messages"][0]["content"] == render_mc("Which 0?", ["A", "B", "C"], ["red", "green", "blue"])
    assert conv["messages"][1]["content"] == "B" and conv["letters"] == ["A", "B", "C"]
    assert easy.evaluate(conv, "B") and not easy.evaluate(conv, "C")
    assert easy[3]["letters"] == ["1", "2", "3", "4"] and easy[3]["messages"][1]["content"] == "4"


def test_gsm8k_calculator_spans_become_tool_parts():
    parts = answer_parts("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18")
    assert parts == [
        {"type": "text", "text": "Janet sells 16 - 3 - 4 = "},
        {"type": "python", "text": "16-3-4"}, {"type": "python_output", "text": "9"},
        {"type": "text", "text": "9 duck eggs.\nShe makes 9 * 2 = $"},
        {"type": "python", "text": "9*2"}, {"type": "python_output", "text": "18"},
        {"type": "text", "text": "18.\n#### 18"},
    ]
    assert answer_parts("<<a=b=3>>x")[:3] == [{"type": "text", "text": ""}, {"type": "python", "text": "a=b"},
                                              {"type": "python_output", "text": "3"}]
    assert extract_answer("so #### 1,234.5 done") == "1234.5" and extract_answer("no answer") is None


def test_gsm8k_layouts(tmp_path):
    rows = [{"question": f"What is {i}+1?", "answer": f"{i}+1=<<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"}
            for i in range(3)]
    _write(tmp_path / "main" / "test-00000-of-00001.parquet", rows)
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    a = GSM8K(subset="main", split="test", source=tmp_path)
    b = GSM8K(subset="main", split="test", source=tmp_path / "jsonl")
    assert [a[i] for i in range(3)] == [b[i] for i in range(3)]
    assert a.eval_type == "generative"


def test_gsm8k_reference_answers_score_1319_of_1319(shared_dir):
    task = GSM8K(subset="main", split="test", source=shared_dir / "data" / "gsm8k")
    assert len(task) == 1319
    assert len(GSM8K(subset="main", split="train", source=shared_dir / "data" / "gsm8k")) == 7473
    correct = wrong_rejected = 0
    for conv in task:
        parts = conv["messages"][-1]["content"]
        # the completion the model would write: text, tool calls in <<...>>, final #### line
        text = "".join(p["text"] if p["type"] != "python" else f"<<{p['text']}=" for p in parts)
        correct += task.evaluate(conv, text)
        ref = extract_answer(parts[-1]["text"])
        wrong_rejected += not task.evaluate(conv, text.rsplit("####", 1)[0] + f"#### {float(ref) + 1:g}")
    assert correct == 1319 and wrong_rejected == 1319
    conv = task[0]
    assert not task.evaluate(conv, "I don't know") and not task.evaluate(conv, "")


def test_humaneval_program_and_layout(tmp_path, shared_dir):
    task = HumanEval(source=shared_dir / "data" / "humaneval")
    assert len(task) == 164 and task.eval_type == "generative"
    conv = next(c for c in task if c["entry_point"] == "has_close_elements")
    assert conv["messages"][1]["content"].startswith(conv["messages"][0]["content"])
    assert extract_imports(conv["messages"][0]["content"]) == "from typing import List"
    assert extract_program("Sure:\n```python\ndef f():\n    return 1\n```\nbye") == "def f():\n    return 1"
    assert extract_program("  def f(): pass  ") == "def f(): pass"
    program = task.program(conv, "```python\n" + conv["messages"][1]["content"] + "\n```")
    assert program.startswith("from typing import List\n\n") and program.endswith("check(has_close_elements)")
    rows = [{"task_id": "HumanEval/0", "prompt": "def add(a, b):\n", "canonical_solution": "    return a + b\n",
             "test": "def check(f):\n    assert f(1, 2) == 3\n", "entry_point": "add"}]
    _write(tmp_path / "openai_humaneval" / "test-00000-of-00001.parquet", rows)
    assert HumanEval(source=tmp_path)[0]["entry_point"] == "add"


def test_humaneval_evaluate_runs_the_tests(shared_dir):
    pytest.importorskip("nanojax.execution")
    task = HumanEval(source=shared_dir / "data" / "humaneval", shuffle_seed=None, stop=2)
    for conv in task:
        assert task.evaluate(conv, "```python\n" + conv["messages"][1]["content"] + "\n```")
        assert task.evaluate(conv, conv["messages"][1]["content"])  # bare code
        assert not task.evaluate(conv, conv["messages"][0]["content"] + "    return None\n")


def test_hub_offline_without_cache_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"), raising=False)
    with pytest.raises(FileNotFoundError, match=r"'openai/gsm8k'.*offline.*source="):
        GSM8K(subset="main", split="test")


def test_mixture_spec_and_sources(tmp_path):
    entries = parse_mixture("smoltalk:train[:100], arc/ARC-Easy:train, gsm8k/main:test[5:9]x2")
    assert entries[0] == {"name": "smoltalk", "subset": None, "split": "train", "start": 0, "stop": 100}
    assert entries[1]["subset"] == "ARC-Easy" and len(entries) == 4 and entries[2] == entries[3]
    assert entries[2]["start"] == 5 and entries[2]["stop"] == 9
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_mixture("nope:train")
    with pytest.raises(ValueError, match="must look like"):
        parse_mixture("smoltalk")
    assert parse_sources("gsm8k=/a, arc/ARC-Easy=/b") == {"gsm8k": "/a", "arc/ARC-Easy": "/b"}
    _write(tmp_path / "data" / "train-00000-of-00001.parquet", _smoltalk_rows(8))
    task = build_task(parse_mixture("smoltalk:train[2:6]")[0], {"smoltalk": str(tmp_path)})
    assert isinstance(task, SmolTalk) and len(task) == 4
    with pytest.raises(FileNotFoundError, match="has no 'test' data files"):
        SmolTalk(split="test", source=tmp_path)


def test_hub_layouts_pick_the_right_files(monkeypatch, tmp_path):
    """source=None reads the split's parquet files from the (here faked) Hugging Face snapshot."""
    import fnmatch

    import huggingface_hub

    gsm = [{"question": "1+1?", "answer": "<<1+1=2>>2\n#### 2"}]
    _write(tmp_path / "gsm8k" / "main" / "test-00000-of-00001.parquet", gsm * 3)
    _write(tmp_path / "gsm8k" / "socratic" / "test-00000-of-00001.parquet", gsm * 5)
    _write(tmp_path / "humaneval" / "openai_humaneval" / "test-00000-of-00001.parquet",
           [{"task_id": "t", "prompt": "def f():\n", "canonical_solution": "    return 1\n",
             "test": "def check(g): pass", "entry_point": "f"}] * 2)
    _write(tmp_path / "smol" / "data" / "train-00000-of-00002.parquet", _smoltalk_rows(3))
    _write(tmp_path / "smol" / "data" / "train-00001-of-00002.parquet", _smoltalk_rows(4))
    _write(tmp_path / "smol" / "data" / "test-00000-of-00001.parquet", _smoltalk_rows(1))
    roots = {"openai/gsm8k": "gsm8k", "openai/openai_humaneval": "humaneval", "HuggingFaceTB/smol-smoltalk": "smol"}
    calls = []

    def fake_snapshot_download(repo_id, repo_type=None, allow_patterns=None, **kw):
        calls.append((repo_id, repo_type))
        root = tmp_path / roots[repo_id]
        files = [str(p.relative_to(root)) for p in root.rglob("*.parquet")]
        assert any(fnmatch.fnmatch(f, pat) for f in files for pat in allow_patterns)
        return str(root)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert len(GSM8K(subset="main", split="test")) == 3
    assert len(GSM8K(subset="socratic", split="test")) == 5
    assert len(HumanEval()) == 2
    assert len(SmolTalk(split="train")) == 7 and len(SmolTalk(split="test")) == 1
    assert all(kind == "dataset" for _, kind in calls)


def test_registry_names_and_old_spellings():
    old = parse_mixture("arc/ARC-Easy:train, arc/ARC-Challenge:train, mmlu/auxiliary_train:train, "
                        "mmlu/all:test[:5200], gsm8k/main:train")
    assert [(e["name"], e["subset"]) for e in old] == [
        ("arc_easy", "ARC-Easy"), ("arc_challenge", "ARC-Challenge"), ("mmlu", "auxiliary_train"), ("mmlu", "all"),
        ("gsm8k", "main")]
    assert parse_mixture("arc_easy:train, ARC-Challenge:train") == old[:2]
    assert resolve("arc/arc-easy") == resolve("Arc-Easy") == ("arc_easy", "ARC-Easy")
    with pytest.raises(ValueError, match=r"unknown task 'arc'; known: smoltalk, .*humaneval \(aliases: arc/ARC-Easy"):
        parse_mixture("arc:train")
    with pytest.raises(ValueError, match="task 'arc_easy' is subset 'ARC-Easy', not 'ARC-Challenge'"):
        resolve("arc_easy/ARC-Challenge")
    assert EVAL_TASKS == ("mmlu", "arc_easy", "arc_challenge", "gsm8k", "humaneval")
    assert [TASKS[t].chance for t in EVAL_TASKS] == [0.25, 0.25, 0.25, 0.0, 0.0]
    assert eval_name("arc/ARC-Challenge") == "arc_challenge" and eval_name("mmlu/all") == "mmlu"
    for not_an_eval in ("smoltalk", "mmlu/auxiliary_train"):
        with pytest.raises(ValueError, match="is not a chat eval; they are mmlu, arc_easy"):
            eval_name(not_an_eval)


def test_sources_in_either_spelling(tmp_path):
    rows = [{"id": "q", "question": "Which?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}]
    _write(tmp_path / "easy" / "test-00000-of-00001.parquet", rows)
    _write(tmp_path / "easy" / "train-00000-of-00001.parquet", rows * 2)
    for spec in (f"arc_easy={tmp_path / 'easy'}", f"arc/ARC-Easy={tmp_path / 'easy'}"):
        sources = parse_sources(spec)
        assert source_for(sources, "arc_easy", "ARC-Easy") == str(tmp_path / "easy")
        assert source_for(sources, "arc_challenge", "ARC-Challenge") is None
        task = eval_task("arc_easy", sources)
        assert isinstance(task, ARC) and (task.subset, task.split, len(task)) == ("ARC-Easy", "test", 1)
        assert len(build_task(parse_mixture("arc/ARC-Easy:train")[0], sources)) == 2
    both = parse_sources("mmlu=/all_subsets, mmlu/auxiliary_train=/aux")
    assert source_for(both, "mmlu", "auxiliary_train") == "/aux" and source_for(both, "mmlu", "all") == "/all_subsets"
    with pytest.raises(ValueError, match="'arc_easy' and 'arc/ARC-Easy' name the same task"):
        parse_sources("arc_easy=/a, arc/ARC-Easy=/b")
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        parse_sources("nope=/a")


@pytest.mark.parametrize("make,message", [
    (lambda: SmolTalk(split="validation"), r"SmolTalk split must be train\|test, got 'validation'"),
    (lambda: ARC(subset="ARC-Hard"), r"ARC subset must be ARC-Easy\|ARC-Challenge, got 'ARC-Hard'"),
    (lambda: GSM8K(split="dev"), r"GSM8K split must be train\|test, got 'dev'"),
    (lambda: HumanEval(split="train"), r"HumanEval split must be test, got 'train'"),
    (lambda: HumanEval(subset="x"), r"HumanEval has no subsets, got 'x'"),
    (lambda: MMLU(subset="all", split="train"), r"MMLU subset 'all' has no 'train' split"),
])
def test_a_split_or_subset_the_dataset_lacks_is_refused_before_reading(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_declared_defaults_and_eval_types():
    assert (SmolTalk.default_split, SmolTalk.eval_type) == ("train", "generative")
    assert (ARC.subsets[0], ARC.default_split, ARC.eval_type) == ("ARC-Easy", "test", "categorical")
    assert (MMLU.subsets[0], MMLU.eval_type) == ("all", "categorical")
    assert (GSM8K.subsets[0], HumanEval.splits) == ("main", ("test",))
