"""The tasks by name: the one table that training mixtures, task sources, `evaluate --tasks` and the report read.

Canonical names: smoltalk, mmlu, arc_easy, arc_challenge, gsm8k, humaneval. A name that stands for a fixed
subset (arc_easy: ARC-Easy) needs no subset; the others may take one after a slash (mmlu/auxiliary_train,
gsm8k/socratic). Old spellings stay accepted (ALIASES: arc/ARC-Easy, arc/ARC-Challenge), and names ignore
case and read '-' as '_'.

  mixture   'name[/subset]:split[[start:stop]][xN]', comma-separated (config.data.train_tasks / val_tasks)
  sources   'name[/subset]=PATH', comma-separated (config.data.task_sources, `evaluate --sources`)
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping

from nanojax.tasks.arc import ARC
from nanojax.tasks.common import DatasetTask
from nanojax.tasks.gsm8k import GSM8K
from nanojax.tasks.humaneval import HumanEval
from nanojax.tasks.mmlu import MMLU
from nanojax.tasks.smoltalk import SmolTalk


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    cls: type[DatasetTask]
    display: str  # its name in tables
    subset: str | None = None  # the subset the name stands for (arc_easy: ARC-Easy); None: any, given as name/subset
    eval_split: str | None = None  # the split `evaluate` scores; None: not a chat eval
    eval_subset: str | None = None  # the subset `evaluate` scores when the name fixes none
    chance: float | None = None  # accuracy of guessing: the task's ChatCORE baseline


TASKS = {
    "smoltalk": TaskInfo(SmolTalk, "SmolTalk"),
    "mmlu": TaskInfo(MMLU, "MMLU", eval_split="test", eval_subset="all", chance=0.25),
    "arc_easy": TaskInfo(ARC, "ARC-Easy", subset="ARC-Easy", eval_split="test", chance=0.25),
    "arc_challenge": TaskInfo(ARC, "ARC-Challenge", subset="ARC-Challenge", eval_split="test", chance=0.25),
    "gsm8k": TaskInfo(GSM8K, "GSM8K", eval_split="test", eval_subset="main", chance=0.0),
    "humaneval": TaskInfo(HumanEval, "HumanEval", eval_split="test", chance=0.0),
}
ALIASES = {"arc/ARC-Easy": "arc_easy", "arc/ARC-Challenge": "arc_challenge"}  # the spellings before the registry
EVAL_TASKS = tuple(name for name, info in TASKS.items() if info.eval_split)  # scored by evaluate, in ChatCORE

_ALIAS_KEYS = {(alias.split("/")[0], alias.split("/")[1].lower()): name for alias, name in ALIASES.items()}
_MIXTURE_ENTRY = re.compile(r"^(?P<name>[A-Za-z0-9_-]+)(?:/(?P<subset>[A-Za-z0-9_.-]+))?:(?P<split>[A-Za-z_]+)"
                            r"(?:\[(?P<start>\d*):(?P<stop>\d*)\])?(?:x(?P<repeat>\d+))?$")


def known() -> str:
    return f"{', '.join(TASKS)} (aliases: {', '.join(ALIASES)})"


def resolve(spec: str) -> tuple[str, str | None]:
    """(canonical name, subset or None) of 'name' or 'name/subset' in either spelling; the fixed subset of
    a name like arc_easy is filled in. ValueError listing the known names for anything else."""
    given, _, subset = spec.strip().partition("/")
    name, subset = given.strip().lower().replace("-", "_"), subset.strip() or None
    alias = _ALIAS_KEYS.get((name, subset.lower() if subset else None))
    if alias:
        return alias, TASKS[alias].subset
    info = TASKS.get(name)
    if info is None:
        raise ValueError(f"unknown task {given.strip()!r}; known: {known()}")
    if info.subset and subset not in (None, info.subset):
        raise ValueError(f"task {name!r} is subset {info.subset!r}, not {subset!r}; known: {known()}")
    return name, info.subset or subset


def eval_name(spec: str) -> str:
    """The canonical name of a chat eval (`spec` in either spelling); ValueError for a task or subset that
    `evaluate` does not score."""
    name, subset = resolve(spec)
    info = TASKS[name]
    if not info.eval_split or subset not in (None, info.subset or info.eval_subset):
        raise ValueError(f"{spec!r} is not a chat eval; they are {', '.join(EVAL_TASKS)}")
    return name


def parse_mixture(spec: str) -> list[dict]:
    """Entries 'name[/subset]:split[[start:stop]][xN]', comma-separated, e.g.
    'smoltalk:train[:10000], arc_easy:train, gsm8k/main:trainx2' -> one dict per task instance, its name
    canonical (xN repeats an entry N times: oversampling, as passing a task twice to nanochat's TaskMixture)."""
    entries = []
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        m = _MIXTURE_ENTRY.match(item)
        if not m:
            raise ValueError(f"mixture entry {item!r} must look like name[/subset]:split[[start:stop]][xN], "
                             f"e.g. 'smoltalk:train[:10000]' or 'arc_easy:train'")
        name, subset = resolve(m["name"] + (f"/{m['subset']}" if m["subset"] else ""))
        entry = {"name": name, "subset": subset, "split": m["split"],
                 "start": int(m["start"] or 0), "stop": int(m["stop"]) if m["stop"] else None}
        entries.extend([entry] * int(m["repeat"] or 1))
    if not entries:
        raise ValueError(f"empty task mixture {spec!r}")
    return entries


def parse_sources(spec: str) -> dict[str, str]:
    """'gsm8k=/data/gsm8k, arc_easy=/data/arc' -> {key: path}, keys as written (task names lower-cased) and
    checked here; `source_for` finds a task's path whichever spelling a key uses."""
    out: dict[str, str] = {}
    seen: dict[tuple[str, str | None], str] = {}
    for item in filter(None, (s.strip() for s in (spec or "").split(","))):
        key, sep, path = item.partition("=")
        if not sep or not key.strip() or not path.strip():
            raise ValueError(f"task source {item!r} must look like name=PATH or name/subset=PATH")
        name, _, subset = key.strip().partition("/")
        key = name.lower() + (f"/{subset}" if subset else "")
        task = resolve(key)
        if task in seen:
            raise ValueError(f"task sources {seen[task]!r} and {key!r} name the same task")
        seen[task] = key
        out[key] = path.strip()
    return out


def source_for(sources: Mapping[str, str] | None, name: str, subset: str | None = None) -> str | None:
    """The local data `sources` (keys in either spelling) gives for canonical task `name` and `subset`: a key
    naming that subset wins over one naming the task alone; None: read the Hugging Face hub."""
    fallback = None
    for key, path in (sources or {}).items():
        key_name, key_subset = resolve(key)
        if key_name == name and key_subset == subset:
            return path
        if key_name == name and key_subset is None:
            fallback = path
    return fallback


def build_task(entry: Mapping[str, Any], sources: Mapping[str, str] | None = None, **kwargs) -> DatasetTask:
    """One task from a parsed mixture entry, reading the local data `sources` names for it."""
    name, subset = entry["name"], entry.get("subset")
    args = dict(split=entry["split"], source=source_for(sources, name, subset), start=entry.get("start", 0),
                stop=entry.get("stop"), **kwargs)
    if subset:
        args["subset"] = subset
    return TASKS[name].cls(**args)


def eval_task(spec: str, sources: Mapping[str, str] | None = None) -> DatasetTask:
    """Chat eval `spec` (name in either spelling) on its eval split and subset."""
    name = eval_name(spec)
    info = TASKS[name]
    subset = info.subset or info.eval_subset
    return build_task({"name": name, "subset": subset, "split": info.eval_split}, sources)
