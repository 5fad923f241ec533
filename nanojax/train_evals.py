"""Evaluations inside a training run, where nanochat's scripts run them: CORE every `train.core_every` steps of
pretraining (base_train.py, launch and HEAD: 2000 steps, 500 examples per task) and ChatCORE every
`train.chatcore_every` steps of SFT (HEAD's chat_sft.py: 200 steps, every categorical problem, 24 generative
ones), each also at the last step. They are `nanojax.evaluate`'s own functions on the training parameters where
they already are (any mesh, every host), and their numbers go to metrics.jsonl and the step log: `core`, and
`chatcore`, `chatcore_cat` (categorical tasks only, as HEAD logs) plus each task's accuracy (`chat_<task>`);
`train.chatcore_tasks` picks a subset (then logged as `chatcore_partial` / `chatcore_cat_partial`).

What they need is checked before the run's files change: the CORE bundle (downloaded once to
$NANOJAX_HOME/data/eval_bundle, or `train.eval_bundle`) and every chat task's data (`data.task_sources` for
local files, else the Hugging Face hub).
"""
from __future__ import annotations

from nanojax.console import log
from nanojax.evaluate import EvalOptions, chatcore, evaluate_tasks
from nanojax.tasks import core
from nanojax.tasks.registry import EVAL_TASKS, eval_name, eval_task, parse_sources


def due(every: int, step: int, total: int) -> bool:
    return every > 0 and (step % every == 0 or step == total)


class LoopEvals:
    """`evals(step, total)` says whether any is due; `evals.run(model, step, total)` -> the metrics to log."""

    def __init__(self, config, tokenizer):
        t = config.train
        self.config, self.tokenizer = config, tokenizer
        self.core_every, self.chatcore_every = t.core_every, t.chatcore_every
        sources = parse_sources(config.data.task_sources)
        bundle = core.ensure_bundle(t.eval_bundle or None) if self.core_every else None
        self.core_opts = EvalOptions(max_per_task=t.core_max_per_task, bundle_dir=str(bundle) if bundle else None)
        self.chat_tasks = [eval_name(s.strip()) for s in t.chatcore_tasks.split(",") if s.strip()] or list(EVAL_TASKS)
        # every task's data read once, now: a missing one fails before the run starts
        self.built = {n: eval_task(n, sources) for n in self.chat_tasks} if self.chatcore_every else {}
        self.categorical = [n for n, task in self.built.items() if task.eval_type == "categorical"]
        self.chat_opts = EvalOptions(max_categorical=t.chatcore_max_categorical,
                                     max_generative=t.chatcore_max_generative, sources=sources)

    @classmethod
    def from_config(cls, config, tokenizer) -> LoopEvals | None:
        t = config.train
        if not (t.core_every or t.chatcore_every):
            return None
        if tokenizer is None:  # e.g. a base config run on data.kind=synthetic for a smoke test
            log("note: train.core_every / train.chatcore_every skipped: this run has no tokenizer (synthetic data)")
            return None
        return cls(config, tokenizer)

    def __call__(self, step: int, total: int) -> bool:
        return due(self.core_every, step, total) or due(self.chatcore_every, step, total)

    def run(self, model, step: int, total: int) -> dict:
        out = {}
        if due(self.core_every, step, total):
            r = evaluate_tasks(model, self.tokenizer, self.config, ["core"], self.core_opts)["core"]
            out["core"] = r["core_metric"]
        if due(self.chatcore_every, step, total):
            results = evaluate_tasks(model, self.tokenizer, self.config, self.chat_tasks, self.chat_opts, self.built)
            partial = "" if set(self.chat_tasks) == set(EVAL_TASKS) else "_partial"  # not comparable to ChatCORE
            out[f"chatcore{partial}"] = chatcore(results)["accuracy"]
            if self.categorical:
                out[f"chatcore_cat{partial}"] = chatcore({k: results[k] for k in self.categorical})["accuracy"]
            out.update({f"chat_{k}": r["accuracy"] for k, r in results.items()})
        return out
