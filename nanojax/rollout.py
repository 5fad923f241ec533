"""Rollouts for stage 3 (`nanojax.rl`): replies sampled with the engine, scored by the task, turned into
policy-gradient rows.

A question's `num_samples` replies come from one engine call that prefills its prompt once; the reward is the
task's own scoring (`task.reward` where a task has one, else `task.evaluate` as 1.0 / 0.0, as nanochat's GSM8K)
and the advantage is reward − the mean reward of the question's replies. A training row is a whole sequence
(prompt + reply, the stop token excluded as nanochat's `generate_batch` does): inputs = ids[:-1],
targets = ids[1:] where the engine sampled the target (mask 1) and −1 on the prompt and on the tool's forced
output (mask 0), weight = the advantage where the target counts and 0 elsewhere; rows are padded to one of a
few fixed lengths (`data.pad_lengths`), padding with target −1 and weight 0.

Nothing here knows the trainer: arrays and numbers in, arrays and numbers out.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np

from nanojax.data.chat import round_up
from nanojax.tasks.common import Task, TaskMixture


@dataclasses.dataclass
class RolloutPosition:
    """Where the rollouts are: questions consumed over all hosts (the next step starts there, cycling through
    the task) and the PRNG key the next step splits. Saved with every checkpoint, the same on every host."""

    questions_consumed: int
    key: jax.Array

    @classmethod
    def start(cls, seed: int) -> RolloutPosition:
        return cls(0, jax.random.key(seed))

    def state(self) -> dict:
        return {"questions_consumed": self.questions_consumed,
                "key": np.asarray(jax.random.key_data(self.key)).tolist()}

    @classmethod
    def from_state(cls, state: dict) -> RolloutPosition:
        """From a checkpoint's data item ({"process_states": [state of each process]}: identical states)."""
        states = state.get("process_states", [state])
        first = states[0]
        if any(s != first for s in states) or "questions_consumed" not in first or "key" not in first:
            raise ValueError(f"the checkpoint's rollout position is not one rl position on every process: {states}")
        return cls(int(first["questions_consumed"]), jax.random.wrap_key_data(np.asarray(first["key"], np.uint32)))

    def next_step(self, examples_per_step: int, process_index: int, process_count: int):
        """(this host's question numbers, this host's key) for the next step; advances the position."""
        share = examples_per_step // process_count
        first = self.questions_consumed + process_index * share
        self.key, step_key = jax.random.split(self.key)
        self.questions_consumed += examples_per_step
        return list(range(first, first + share)), jax.random.fold_in(step_key, process_index)


@dataclasses.dataclass
class Group:
    """One question's replies: each sequence is prompt + reply, its mask 0 on the prompt and forced tokens."""

    prompt_len: int
    sequences: list[list[int]]
    masks: list[list[int]]
    rewards: np.ndarray  # (num_samples,) float32

    @property
    def advantages(self) -> np.ndarray:
        return self.rewards - self.rewards.mean()


def scorer(dataset: Task, index: int) -> Task:
    """The task that scores question `index` of `dataset` (a mixture's member task, or the task itself)."""
    if isinstance(dataset, TaskMixture):
        return dataset.tasks[dataset.locate(index)[0]]
    return dataset


def check_generative(dataset: Task, what: str) -> None:
    """ValueError naming a task whose replies cannot be scored (categorical tasks are never sampled)."""
    for task in dataset.tasks if isinstance(dataset, TaskMixture) else [dataset]:
        if getattr(task, "eval_type", "generative") != "generative":
            raise ValueError(f"{what}: {task!r} is scored categorically; RL samples replies and needs generative "
                             f"tasks (e.g. gsm8k, humaneval)")


def reward(task: Task, conversation: dict, completion: str) -> float:
    score = getattr(task, "reward", None)
    return float(score(conversation, completion)) if score else float(task.evaluate(conversation, completion))


def passed(task: Task, conversation: dict, completion: str) -> float:
    return float(task.evaluate(conversation, completion))


def _seed(key) -> int:
    return int(jax.random.randint(key, (), 0, 2**31 - 1))


def sample_groups(engine, tokenizer, dataset: Task, question_numbers: Sequence[int], key, *, num_samples: int,
                  max_new_tokens: int, temperature: float, top_k: int, sample_rows: int,
                  score=reward) -> list[Group]:
    """`num_samples` replies to each question (numbers taken modulo the task's length: epochs cycle), scored by
    `score(task, conversation, completion)`. Questions go to the engine `sample_rows // num_samples` at a time,
    each call with its own seed from `key`."""
    seq_len = engine.seq_len
    per_call = max(1, sample_rows // num_samples)
    groups: list[Group] = []
    for c, start in enumerate(range(0, len(question_numbers), per_call)):
        numbers = [n % len(dataset) for n in question_numbers[start:start + per_call]]
        conversations = [dataset[i] for i in numbers]
        prompts = [tokenizer.render_for_completion(conv)[-(seq_len - 1):] for conv in conversations]
        sequences, masks = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=max_new_tokens,
                                                 temperature=temperature, top_k=top_k or None,
                                                 seed=_seed(jax.random.fold_in(key, c)))
        for j, (i, conv, prompt) in enumerate(zip(numbers, conversations, prompts)):
            rows = slice(j * num_samples, (j + 1) * num_samples)
            task = scorer(dataset, i)
            rewards = [score(task, conv, tokenizer.decode(s[len(prompt):])) for s in sequences[rows]]
            groups.append(Group(len(prompt), sequences[rows], masks[rows], np.asarray(rewards, np.float32)))
    return groups


def row_length(groups: Sequence[Group]) -> int:
    """Inputs per row before padding: the longest sequence less one."""
    return max(len(s) for g in groups for s in g.sequences) - 1


def policy_gradient_rows(groups: Sequence[Group], lengths: list[int], pad_id: int,
                         length: int | None = None) -> dict[str, np.ndarray]:
    """{"inputs", "targets", "weights"} of shape (rows, T): T = the allowed length (`lengths`, ascending) that
    fits `length` (default: this host's longest row; pass the longest over all hosts so shapes agree)."""
    T = round_up(length if length is not None else row_length(groups), lengths)
    rows = sum(len(g.sequences) for g in groups)
    inputs = np.full((rows, T), pad_id, np.int32)
    targets = np.full((rows, T), -1, np.int32)
    weights = np.zeros((rows, T), np.float32)
    r = 0
    for g in groups:
        for seq, mask, advantage in zip(g.sequences, g.masks, g.advantages):
            ids, m = np.asarray(seq, np.int32), np.asarray(mask, bool)
            if len(ids) != len(m):
                raise ValueError(f"sequence of {len(ids)} tokens has a mask of {len(m)}")
            n = len(ids) - 1
            inputs[r, :n] = ids[:-1]
            targets[r, :n] = np.where(m[1:], ids[1:], -1)
            weights[r, :n] = np.where(m[1:], advantage, 0.0)
            r += 1
    return {"inputs": inputs, "targets": targets, "weights": weights}


def pass_at_k(engine, tokenizer, dataset: Task, question_numbers: Sequence[int], key, *, num_samples: int,
              max_new_tokens: int, temperature: float, top_k: int, sample_rows: int) -> np.ndarray:
    """Per k = 1..num_samples, how many of the questions have a reply that passes `task.evaluate` among their
    first k samples (nanochat's pass@k)."""
    groups = sample_groups(engine, tokenizer, dataset, question_numbers, key, num_samples=num_samples,
                           max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           sample_rows=sample_rows, score=passed)
    counts = np.zeros(num_samples, np.int64)
    for g in groups:
        counts += np.cumsum(g.rewards > 0) > 0
    return counts
