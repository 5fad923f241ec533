"""Data pipelines. Every iterator yields {"inputs", "targets"} int32 arrays of (this process's rows, T)
and has get_state() -> JSON dict / set_state(dict) / close(), so the train loop can checkpoint it."""
from __future__ import annotations

from nanojax.data.kinds import CONVERSATION_KINDS, canonical_kind

__all__ = ["canonical_kind", "make_iterator"]


def make_iterator(config, *, split: str, batch_size: int, process_index: int, process_count: int,
                  tokenizer=None):
    """The iterator named by `config.data.kind` for `split` ('train' or 'val').

    The pipelines are imported here, not at the top: `python -m nanojax.data.fineweb` (and `.chat`) run
    those modules as __main__, and a package that had imported them already would load them twice.
    """
    kind = canonical_kind(config.data.kind)
    if kind == "synthetic":
        from nanojax.data.synthetic import SyntheticIterator

        return SyntheticIterator(
            batch_size=batch_size, seq_len=config.model.seq_len, vocab_size=config.model.vocab_size,
            seed=config.data.seed, process_index=process_index, process_count=process_count, split=split,
        )
    if kind in CONVERSATION_KINDS:
        from nanojax.data.chat import make_chat_iterator_from_config

        return make_chat_iterator_from_config(config, split=split, batch_size=batch_size,
                                              process_index=process_index, process_count=process_count,
                                              tokenizer=tokenizer)
    from nanojax.data.pretrain import make_iterator_from_config

    return make_iterator_from_config(config, split=split, batch_size=batch_size, process_index=process_index,
                                     process_count=process_count, tokenizer=tokenizer)
