import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import micro_config
from nanojax import evaluate as ev
from nanojax.model import GPT
from nanojax.tasks import core
from nanojax.tasks.registry import EVAL_TASKS, TASKS
from nanojax.tokenizer import Tokenizer

VOCAB = 265


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


def _jit_logits(model):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))

    def logits(ids):  # one sequence, right-padded to the context (causal: padding changes nothing before it)
        T = model.cfg.seq_len
        x = np.zeros((1, T), np.int32)
        x[0, :len(ids)] = ids
        return f(state, jnp.asarray(x))[0, :len(ids)]
    return logits


@pytest.fixture(scope="module")
def model():
    c = micro_config()
    c.model.vocab_size = VOCAB
    c.model.seq_len = 128
    m = GPT(c.model, rngs=nnx.Rngs(0))
    state = nnx.state(m, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(m, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    return m


# ------------------------------------------------------------------------------------------ CORE fixtures
MC = [{"query": f"Q{i}: which colour is {c}?", "choices": ["red", "green", "blue", "pink"], "gold": g}
      for i, (c, g) in enumerate([("a rose", 0), ("grass", 1), ("the sky", 2), ("a pig", 3), ("blood", 0),
                                  ("a leaf", 1)])]
SCHEMA = [{"context_options": [f"Tom{i} fed the cat", f"Ann{i} fed the dog"], "continuation": "and it purred.",
           "gold": i % 2} for i in range(5)]
LM = [{"context": f"Count {i} {i + 1} {i + 2} ", "continuation": f"{i + 3}"} for i in range(5)]


def make_bundle(root, shots=(2, 1, 0)):
    (root / "eval_data" / "sub").mkdir(parents=True)
    for name, rows in (("mc.jsonl", MC), ("sub/schema.jsonl", SCHEMA), ("lm.jsonl", LM)):
        (root / "eval_data" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "core.yaml").write_text(f"""icl_tasks:
- label: fixture_mc
  dataset_uri: mc.jsonl
  num_fewshot: [{shots[0]}]
  icl_task_type: multiple_choice
- label: fixture_schema
  dataset_uri: sub/schema.jsonl
  num_fewshot: [{shots[1]}]
  icl_task_type: schema
- label: fixture_lm
  dataset_uri: lm.jsonl
  num_fewshot: [{shots[2]}]
  icl_task_type: language_modeling
  continuation_delimiter: ""
""")
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Task Type,#shots,Random baseline,Centered Metric?\n"
        "fixture_mc,x,y,2,25.0,\nfixture_schema,x,y,1,50.0,\nfixture_lm,x,y,0,0.0,\n")
    return root


def oracle_forward(tok, answers, good=True):
    """Losses 0 on rows whose text ends with a gold answer (1 elsewhere); predictions = the true next token."""
    def forward(ids):
        B, T = ids.shape
        losses = np.ones((B, T), np.float32)
        for b in range(B):
            text = tok.decode([t for t in ids[b] if t != tok.bos_token_id])
            if any(text.endswith(a) for a in answers) == good:
                losses[b] = 0.0
        preds = np.concatenate([ids[:, 1:], ids[:, -1:]], axis=1)
        if not good:
            preds = preds + 1
        return losses, preds
    return forward


def test_core_prompts_follow_nanochat_templates(tok, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    specs = core.load_task_specs(bundle)
    assert [s["task_type"] for s in specs] == ["multiple_choice", "schema", "language_modeling"]
    assert [s["random_baseline"] for s in specs] == [25.0, 50.0, 0.0]
    p = core.render_prompts("multiple_choice", MC[0], " ", [MC[1]])
    assert p[1] == "Q1: which colour is grass? green\n\nQ0: which colour is a rose? green"
    s = core.render_prompts("schema", SCHEMA[1], " ", [])
    assert s == ["Tom1 fed the cat and it purred.", "Ann1 fed the dog and it purred."]
    lm = core.render_prompts("language_modeling", LM[0], "", [])
    assert lm == ["Count 0 1 2", "Count 0 1 23"]
    seqs = core.example_sequences(tok, LM, 0, specs[2], None)
    (t, s0, e0), = seqs
    assert tok.decode(t[s0:e0]) == "3" and t[0] == tok.bos_token_id
    mc = core.example_sequences(tok, MC, 0, specs[0], None)
    assert len(mc) == 4 and all(tok.decode(t[s:e]).strip() in {"red", "green", "blue", "pink"} for t, s, e in mc)
    sc = core.example_sequences(tok, SCHEMA, 0, specs[1], None)
    assert all(tok.decode(t[s:e]).endswith("and it purred.") for t, s, e in sc)
    # fewshot draws exclude the item and follow random.Random(1234 + idx)
    cropped = core.example_sequences(tok, MC, 3, specs[0], 40)
    assert all(len(t) <= 40 and e == len(t) for t, s, e in cropped)


def test_lm_continuation_merged_by_bpe_is_split_at_the_boundary():
    ranks = {bytes([i]): i for i in range(256)}
    ranks[b"23"] = 256  # "2" + "3" merge: "Count 0 1 2" is not a token prefix of "Count 0 1 23"
    tok = Tokenizer.from_ranks(ranks)
    assert tok.encode("23") == [256]
    spec = {"label": "x", "task_type": "language_modeling", "num_fewshot": 0, "continuation_delimiter": ""}
    (t, s, e), = core.example_sequences(tok, LM, 0, spec, None)
    assert t[:s] == tok.encode("Count 0 1 2", prepend=tok.bos_token_id)
    assert tok.decode(t[s:e]) == "3" and e == len(t)


def test_core_scoring_each_type_with_oracles(tok, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    specs = {s["label"]: s for s in core.load_task_specs(bundle)}
    mc_data = core.load_task_data(bundle, specs["fixture_mc"])
    assert sorted(r["query"] for r in mc_data) == sorted(r["query"] for r in MC)  # shuffled, complete

    def mc_oracle(good):
        def forward(ids):
            B, T = ids.shape
            losses = np.ones((B, T), np.float32)
            for b in range(B):
                text = tok.decode([t for t in ids[b] if t != tok.bos_token_id])
                last = text.rsplit("\n\n", 1)[-1]
                if not last:  # padding row
                    continue
                row = next(r for r in MC if last.startswith(r["query"]))
                if last.endswith(" " + row["choices"][row["gold"]]) == good:
                    losses[b] = 0.0
            return losses, np.zeros_like(ids)
        return forward

    assert core.evaluate_task(mc_oracle(True), tok, mc_data, specs["fixture_mc"], max_len=None, batch_rows=4) == 1.0
    assert core.evaluate_task(mc_oracle(False), tok, mc_data, specs["fixture_mc"], max_len=None, batch_rows=4) == 0.0

    def schema_oracle(ids):
        B, T = ids.shape
        losses = np.ones((B, T), np.float32)
        for b in range(B):
            text = tok.decode([t for t in ids[b] if t != tok.bos_token_id])
            last = text.rsplit("\n\n", 1)[-1]
            if not last:  # padding row
                continue
            row = next(r for r in SCHEMA if any(last.startswith(c) for c in r["context_options"]))
            if last.startswith(row["context_options"][row["gold"]]):
                losses[b] = 0.0
        return losses, np.zeros_like(ids)

    sc_data = core.load_task_data(bundle, specs["fixture_schema"])
    assert core.evaluate_task(schema_oracle, tok, sc_data, specs["fixture_schema"], max_len=None, batch_rows=3) == 1.0

    lm_data = core.load_task_data(bundle, specs["fixture_lm"])
    perfect = oracle_forward(tok, [], good=True)
    assert core.evaluate_task(perfect, tok, lm_data, specs["fixture_lm"], max_len=None, batch_rows=2) == 1.0
    wrong = oracle_forward(tok, [], good=False)
    assert core.evaluate_task(wrong, tok, lm_data, specs["fixture_lm"], max_len=None, batch_rows=2) == 0.0


def test_core_with_model_matches_unbatched_reference(tok, model, tmp_path):
    bundle = make_bundle(tmp_path / "b")
    forward = ev.core_forward(model)
    logits_of = _jit_logits(model)
    out = core.evaluate_core(forward, tok, bundle, max_len=int(model.cfg.seq_len), batch_rows=8, log=lambda *a: None)
    for spec in core.load_task_specs(bundle):
        data = core.load_task_data(bundle, spec)
        correct = 0
        for i in range(len(data)):
            seqs = core.example_sequences(tok, data, i, spec, int(model.cfg.seq_len))
            scores, exact = [], []
            for t, s, e in seqs:
                logp = jax.nn.log_softmax(logits_of(t), -1)
                tgt = jnp.asarray(t[s:e])
                scores.append(float(-jnp.mean(logp[s - 1:e - 1][jnp.arange(e - s), tgt])))
                exact.append(bool(jnp.all(jnp.argmax(logp[s - 1:e - 1], -1) == tgt)))
            if spec["task_type"] == "language_modeling":
                correct += exact[0]
            else:
                correct += int(np.argmin(scores)) == data[i]["gold"]
        acc = correct / len(data)
        assert out["results"][spec["label"]] == pytest.approx(acc)
        assert out["centered_results"][spec["label"]] == pytest.approx(
            (acc - spec["random_baseline"] / 100) / (1 - spec["random_baseline"] / 100))
    assert out["core_metric"] == pytest.approx(np.mean(list(out["centered_results"].values())))


# ------------------------------------------------------------------------------------------ chat evals
class LetterTask:
    """A categorical fixture: 4 choices, gold letter given."""
    eval_type = "categorical"

    def __init__(self, golds):
        self.golds = golds

    def __len__(self):
        return len(self.golds)

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"Question {i}? A, B, C or D"},
                             {"role": "assistant", "content": self.golds[i]}], "letters": ("A", "B", "C", "D")}

    def evaluate(self, conversation, completion):
        return completion == conversation["messages"][-1]["content"]


def test_categorical_scoring_matches_manual(tok, model):
    task = LetterTask(list("ABCDABCDAB"))
    out = ev.evaluate_categorical(model, tok, task, batch_size=4)
    letter_ids = [tok.encode(x)[0] for x in "ABCD"]
    logits_of = _jit_logits(model)
    predicted = []
    for i in range(len(task)):
        ids = tok.render_for_completion(task[i])
        logits = logits_of(ids)[-1]
        predicted.append("ABCD"[int(jnp.argmax(logits[jnp.asarray(letter_ids)]))])
    want = sum(p == g for p, g in zip(predicted, task.golds))
    assert out["passed"] == want and out["total"] == 10
    # a task whose gold is always the model's choice scores 1.0; max_problems cuts
    assert ev.evaluate_categorical(model, tok, LetterTask(predicted), batch_size=3)["accuracy"] == 1.0
    assert ev.evaluate_categorical(model, tok, LetterTask(predicted), max_problems=4)["total"] == 4


class EchoTask:
    eval_type = "generative"

    def __init__(self, n):
        self.n = n
        self.completions = {}

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": "x"}], "i": i}

    def evaluate(self, conversation, completion):
        self.completions.setdefault(conversation["i"], []).append(completion)
        return conversation["i"] % 2 == 0


def test_generative_eval_batched_equals_one_at_a_time(tok, model):
    a, b = EchoTask(5), EchoTask(5)
    ra = ev.evaluate_generative(model, tok, a, batch_size=3, max_new_tokens=6)
    rb = ev.evaluate_generative(model, tok, b, batch_size=1, max_new_tokens=6)
    assert ra == rb and {k: ra[k] for k in ("accuracy", "passed", "total")} == {"accuracy": 3 / 5, "passed": 3,
                                                                                 "total": 5}
    assert a.completions == b.completions


class ScriptedEngine:
    """generate_batch returns fixed replies: (text, stopped) per problem; a reply that did not stop is padded
    to the token budget, as the engine's are."""

    def __init__(self, tok, replies):
        self.tok, self.replies = tok, replies

    def generate_batch(self, prompts, num_samples=1, max_tokens=None, **kwargs):
        out = []
        for p in prompts:
            text, stopped = self.replies[len(out)]
            ids = self.tok.encode(text)
            out.append(list(p) + (ids if stopped else (ids + [32] * max_tokens)[:max_tokens]))
        del self.replies[:len(out)]
        return out, None


def test_generative_eval_counts_replies_that_end_and_keep_the_answer_format(tok, model):
    from nanojax.tasks.gsm8k import GSM8K

    class Format(EchoTask):
        answer_format = GSM8K.answer_format
        well_formed = GSM8K.well_formed

    replies = [("so #### 4", True), ("no answer", True), ("#### 12 and more", False), ("rambling", False)]
    r = ev.evaluate_generative(model, tok, Format(4), engine=ScriptedEngine(tok, list(replies)), batch_size=2,
                               max_new_tokens=20)
    assert (r["ended"], r["well_formed"], r["total"]) == (2, 2, 4)
    assert ev.format_note(Format(4), r) == " | 2/4 replies ended with <|assistant_end|>, 2/4 in the '#### N' form"
    assert "well_formed" not in ev.evaluate_generative(model, tok, EchoTask(2), max_new_tokens=4)


def test_chatcore_and_markdown():
    res = {"mmlu": {"accuracy": 0.4, "passed": 4, "total": 10}, "gsm8k": {"accuracy": 0.1, "passed": 1, "total": 10}}
    cc = ev.chatcore(res)
    assert cc["accuracy"] == pytest.approx(((0.4 - 0.25) / 0.75 + 0.1) / 2) and not cc["complete"]
    full = {t: {"accuracy": 0.5, "passed": 1, "total": 2} for t in ev.CHAT_TASKS}
    assert ev.chatcore(full)["complete"]
    md = ev.markdown_table({**res, "chatcore": cc})
    assert "| MMLU | 0.4000 (4/10) | 0.3151 |" in md and "ChatCORE" in md


def test_task_names_come_from_the_registry(tmp_path):
    assert ev.CHAT_TASKS == EVAL_TASKS and ev.DISPLAY["arc_challenge"] == TASKS["arc_challenge"].display
    assert ev.parse_tasks("core, ARC-Easy, arc/ARC-Challenge,mmlu") == ["core", "arc_easy", "arc_challenge", "mmlu"]
    assert ev.parse_tasks("all") == ["core", "bpb", *EVAL_TASKS] and ev.parse_tasks("chat") == list(EVAL_TASKS)
    with pytest.raises(SystemExit, match=r"unknown task\(s\) \['smoltalk', 'arc'\]; known: core, bpb, mmlu.*"
                                         r"aliases: arc/ARC-Easy, arc/ARC-Challenge"):
        ev.parse_tasks("smoltalk,arc,gsm8k")
    step_dir = tmp_path / "run" / "checkpoints" / "7"
    step_dir.mkdir(parents=True)
    assert ev.run_dir_containing(step_dir) == ev.run_dir_containing(tmp_path / "run") == (tmp_path / "run").resolve()


# ------------------------------------------------------------------------------------------ CLI end to end
@pytest.mark.slow
def test_cli_end_to_end_on_a_micro_run(tmp_path, tok, shared_dir):
    from nanojax.train import run

    tok.save()  # $NANOJAX_HOME/tokenizer: the run's metadata points there
    c = micro_config(tmp_path / "run", steps=1)
    c.model.vocab_size = VOCAB
    c.model.seq_len = 128
    c.train.total_batch_size = c.train.device_batch_size * 128
    run(c)
    bundle = make_bundle(tmp_path / "bundle")
    mmlu = tmp_path / "mmlu.jsonl"
    mmlu.write_text("".join(json.dumps({"question": f"q{i}", "choices": ["a", "b", "c", "d"], "answer": i % 4,
                                        "subject": "x"}) + "\n" for i in range(3)))
    gsm = tmp_path / "gsm8k.jsonl"
    gsm.write_text(json.dumps({"question": "1+1?", "answer": "1+1=<<1+1=2>>2\n#### 2"}) + "\n")
    arc = tmp_path / "arc.jsonl"
    arc.write_text("".join(json.dumps({"id": str(i), "question": f"arc q{i}", "answerKey": "B",
                                       "choices": {"text": ["x", "y", "z"], "label": ["A", "B", "C"]}}) + "\n"
                           for i in range(3)))
    he = shared_dir / "data" / "humaneval" / "HumanEval.jsonl.gz"
    out = ev.main([str(c.run_dir), "--tasks=all", "--max-per-task=2", f"--eval-bundle={bundle}",
                   f"--sources=mmlu={mmlu},gsm8k={gsm},humaneval={he},arc_easy={arc},arc/ARC-Challenge={arc}",
                   "--max-new-tokens=4", "--bpb-tokens=1024"])
    assert set(out) >= {"core", "bpb", "mmlu", "arc_easy", "arc_challenge", "gsm8k", "humaneval"}
    assert out["bpb"]["bpb"] > 0 and out["mmlu"]["total"] == 2 and out["humaneval"]["total"] == 2
    saved = json.loads((tmp_path / "run" / "eval_results.json").read_text())
    assert saved["chatcore"]["complete"] and saved["core"]["core_metric"] == pytest.approx(out["core"]["core_metric"])
    assert "CORE" in (tmp_path / "run" / "eval_results.md").read_text()


def test_bundle_is_downloaded_once_into_nanojax_home(tmp_path, _nanojax_home):
    import zipfile

    src = make_bundle(tmp_path / "src" / "eval_bundle")
    zpath = tmp_path / "eval_bundle.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        for f in src.rglob("*"):
            z.write(f, f.relative_to(src.parent))
    got = core.ensure_bundle(url=zpath.as_uri())
    assert got == _nanojax_home / "data" / "eval_bundle"
    assert [s["label"] for s in core.load_task_specs(got)] == ["fixture_mc", "fixture_schema", "fixture_lm"]
    assert core.ensure_bundle(url="file:///nonexistent.zip") == got  # cached: no second download
    assert core.ensure_bundle(src) == src  # a local copy is used as is
    with pytest.raises(FileNotFoundError):
        core.ensure_bundle(tmp_path)
