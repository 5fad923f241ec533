"""SFT best-fit packing (data.kind=sft, data.packing=bestfit): rows identical to nanochat HEAD's own
`sft_data_generator_bos_bestfit` on the same conversations (1 rank, and 2 ranks with a small buffer), exact
resume (same layout and 1 -> 2 processes), the finite val split, refusals of mismatched states."""
import pathlib

import numpy as np
import pytest

from nanojax.data.chat import make_chat_iterator_from_config, make_sft_bestfit_iterator, make_sft_iterator

GOLDEN = pathlib.Path(__file__).parent / "fixtures" / "nanochat_head_sft" / "golden.npz"
UPDATE = ("regenerate with tests/fixtures/nanochat_head_sft/make_golden.py (README.md there) only if HEAD's "
          "generator itself is what changed")


class Rendered(list):
    """A task whose conversations are already (ids, mask): the fixture's, as HEAD's test tokenizer sees them."""

    def __repr__(self):
        return f"Rendered({len(self)})"


class RenderedTokenizer:
    def __init__(self, bos):
        self.bos_token_id = bos

    def render_conversation(self, conversation, max_tokens):
        ids, mask = conversation
        return list(ids[:max_tokens]), list(mask[:max_tokens])

    def encode_special(self, name):
        return self.bos_token_id


def scenario(name):
    g = np.load(GOLDEN)
    B, T, buffer_size, world, bos = g[f"{name}/setup"].tolist()
    cuts = np.cumsum(g[f"{name}/lengths"])[:-1]
    convs = Rendered(zip(np.split(g[f"{name}/ids"].tolist(), cuts), np.split(g[f"{name}/mask"].tolist(), cuts)))
    convs = Rendered((list(map(int, i)), list(map(int, m))) for i, m in convs)
    golden = {r: (g[f"{name}/inputs{r}"], g[f"{name}/targets{r}"]) for r in range(world)}
    return dict(B=B, T=T, buffer=buffer_size, world=world, tok=RenderedTokenizer(bos), convs=convs), golden


def iterator(s, *, rank=0, world=None, rows=None, finite=False, prefetch=0):
    return make_sft_bestfit_iterator(s["convs"], s["tok"], batch_size=rows or s["B"], seq_len=s["T"],
                                     process_index=rank, process_count=world or s["world"], finite=finite,
                                     buffer_size=s["buffer"], prefetch=prefetch)


@pytest.mark.parametrize("name", ["one_rank", "small_buffer_two_ranks"])
def test_rows_equal_nanochat_head_sft_generator(name):
    s, golden = scenario(name)
    for rank, (inputs, targets) in golden.items():
        it = iterator(s, rank=rank, prefetch=2)
        got = [next(it) for _ in range(len(inputs))]
        it.close()
        np.testing.assert_array_equal(np.stack([b["inputs"] for b in got]), inputs, err_msg=UPDATE)
        np.testing.assert_array_equal(np.stack([b["targets"] for b in got]), targets, err_msg=UPDATE)


def test_resume_is_exact_also_on_two_processes():
    s, golden = scenario("one_rank")
    inputs, targets = golden[0]
    it = iterator(s)
    for _ in range(13):
        next(it)
    state = it.get_state()
    assert state["packing"] == "bestfit" and 0 < len(state["streams"]["0"]["buffer"]) <= s["buffer"]
    same = iterator(s)
    same.set_state(state)
    np.testing.assert_array_equal(next(same)["inputs"], inputs[13])
    halves = [iterator(s, rank=p, world=2, rows=s["B"] // 2) for p in range(2)]  # 1 stream read by 2 processes
    for h in halves:
        h.set_state(state)
    for k in range(13, 20):
        got = [h.__next__() for h in halves]
        np.testing.assert_array_equal(np.concatenate([b["inputs"] for b in got]), inputs[k])
        np.testing.assert_array_equal(np.concatenate([b["targets"] for b in got]), targets[k])


def test_val_split_scores_every_conversation_once_then_stops():
    s, _ = scenario("small_buffer_two_ranks")
    want = sum(int(np.sum(np.asarray(m[1:]) == 1)) for _, m in s["convs"])
    trained, batches = 0, 0
    for rank in range(2):
        it = iterator(s, rank=rank, finite=True)
        for b in it:
            assert b["inputs"].shape == (s["B"], s["T"])
            trained += int(np.sum(b["targets"] != -1))
            batches += 1
        assert it.stats["pad_tokens"] > 0 and it.stats["conversations"] == len(s["convs"]) // 2
    assert trained == want and batches > 2


def test_a_state_from_the_other_sft_packing_is_refused():
    s, _ = scenario("one_rank")
    packed = iterator(s)
    next(packed)
    per_row = make_sft_iterator(s["convs"], s["tok"], batch_size=4, seq_len=s["T"], prefetch=0)
    with pytest.raises(ValueError, match="best-fit packing"):
        per_row.set_state(packed.get_state())
    next(per_row)
    with pytest.raises(ValueError, match="one conversation per row"):
        iterator(s).set_state(per_row.get_state())


def test_config_dispatch_and_midtraining_refuses_bestfit(monkeypatch):
    from helpers import micro_config
    from nanojax.data import chat

    s, golden = scenario("one_rank")
    monkeypatch.setitem(chat._TASK_CACHE, ("t", "", 42), s["convs"])
    c = micro_config()
    c.data.kind, c.data.packing, c.data.train_tasks, c.data.prefetch = "sft", "bestfit", "t", 0
    c.model.seq_len = s["T"]
    it = make_chat_iterator_from_config(c, split="train", batch_size=4, process_index=0, process_count=1,
                                        tokenizer=s["tok"])
    np.testing.assert_array_equal(next(it)["inputs"], golden[0][0][0])
    c.data.kind = "mid"
    with pytest.raises(ValueError, match="midtraining packs conversations by concatenation only"):
        make_chat_iterator_from_config(c, split="train", batch_size=4, process_index=0, process_count=1,
                                       tokenizer=s["tok"])


def test_a_stream_with_no_usable_conversation_is_an_error_not_a_hang():
    from nanojax.tasks.common import BadRowError

    class Broken(RenderedTokenizer):
        def render_conversation(self, conversation, max_tokens):
            raise BadRowError("broken row")

    s, _ = scenario("one_rank")
    it = make_sft_bestfit_iterator(s["convs"], Broken(s["tok"].bos_token_id), batch_size=2, seq_len=s["T"],
                                   skip_bad_rows=True, prefetch=0)
    with pytest.raises(ValueError, match="has no conversation that renders"):
        next(it)
