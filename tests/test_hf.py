"""Hugging Face export: transformers' own NanoChatForCausalLM and AutoTokenizer load what `to-hf` writes and
compute what nanojax computes; `from-hf` brings it back bit for bit."""
import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import micro_config, random_weights

from nanojax import convert, hf
from nanojax.checkpoint import Checkpointer, load_model
from nanojax.engine import Engine
from nanojax.model import GPT
from nanojax.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers", minversion="5.0")
torch = pytest.importorskip("torch")

TEXT = ["The quick brown fox jumps over the lazy dog. 12345 + 678 = 13023!", "def f(x):\n    return x ** 2\n",
        "Ünïcödé café — naïve 東京 🙂 tabs\tand  spaces\n\n\nnew lines", "I'll they've we're DON'T 3.14159"] * 40
CONVERSATIONS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "And 7*6?"},
                  {"role": "assistant", "content": [{"type": "text", "text": "Let me compute. "},
                                                    {"type": "python", "text": "7*6"},
                                                    {"type": "python_output", "text": "42"},
                                                    {"type": "text", "text": " The answer is 42."}]}]},
]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A micro run with random (non-zero) weights, its tokenizer, exported to a Hugging Face directory."""
    root = tmp_path_factory.mktemp("hf")
    tok = Tokenizer.train(TEXT, 320)
    config = micro_config(root / "run")
    with config.unlocked():
        config.model.vocab_size, config.model.n_kv_head = tok.vocab_size, 1
        config.data.tokenizer_dir = str(tok.save(root / "tokenizer"))
    model = random_weights(GPT(config.model, rngs=nnx.Rngs(0)), seed=1, scale=0.3)
    ckptr = Checkpointer(config.run_dir, async_save=False)
    ckptr.save(1, nnx.state(model, nnx.Param), None, None,
               {"step": 1, "config": config.to_dict(), "tokenizer_dir": config.data.tokenizer_dir}, force=True)
    ckptr.close()
    out = root / "export"
    convert.main(["to-hf", config.run_dir, "--out", str(out)])
    return model, tok, out


def test_transformers_logits_equal_nanojax(exported):
    model, _, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(hf_model).__name__ == "NanoChatForCausalLM"
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, model.cfg.seq_len))
    with torch.no_grad():
        theirs = hf_model(torch.from_numpy(ids)).logits.numpy()
    ours = np.asarray(model(ids))
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=0)


def test_generate_matches_the_engine_greedily(exported):
    model, tok, out = exported
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    prompt = tok.render_for_completion({"messages": [*CONVERSATIONS[0]["messages"][:1],
                                                     {"role": "assistant", "content": "x"}]})
    seqs, _ = Engine(model, tok, use_tool=False).generate_batch(prompt, max_tokens=12, temperature=0.0)
    ours = seqs[0][len(prompt):]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
    theirs = theirs.tolist()
    stops = set(hf_model.generation_config.eos_token_id)
    cut = next((i for i, t in enumerate(theirs) if t in stops), len(theirs))
    assert ours == theirs[:cut]


def test_auto_tokenizer_encodes_and_renders_as_nanojax(exported):
    _, tok, out = exported
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    texts = [*TEXT[:4], "  leading spaces", "x" * 300, "10000000000 dollars", "\r\n\r\n", "a<b>c 'quoted'"]
    for text in texts:
        assert hf_tok.encode(text, add_special_tokens=False) == tok.encode(text), text
        assert hf_tok.decode(tok.encode(text)) == text
    for conversation in CONVERSATIONS:
        messages = conversation["messages"]
        ids, _ = tok.render_conversation(conversation)
        rendered = hf_tok.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(rendered) == ids
        prompt = hf_tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True,
                                            return_dict=False)
        assert list(prompt) == tok.render_for_completion(conversation)


def test_from_hf_round_trip_is_exact(exported, tmp_path):
    model, tok, out = exported
    run = convert.from_hf(str(out), str(tmp_path / "back"))
    back, back_tok, _ = load_model(run)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)), jax.tree.leaves(nnx.state(back, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back_tok is not None and back_tok.encode(TEXT[2]) == tok.encode(TEXT[2])


def test_unrepresentable_options_and_foreign_models_are_refused(exported, tmp_path, monkeypatch):
    import dataclasses

    from nanojax.config import ModelConfig

    _, tok, out = exported
    cfg = ModelConfig.of(micro_config().model)
    assert hf.unrepresentable(cfg) == []
    # an option transformers has no field for (as the newer family's will be), set away from the launch default
    monkeypatch.setattr(hf, "MAPPED_FIELDS", hf.MAPPED_FIELDS - {"mlp_ratio"})
    with pytest.raises(ValueError, match="cannot represent model.mlp_ratio=2"):
        hf.write_export(tmp_path / "x", dataclasses.replace(cfg, mlp_ratio=2), {}, tok)
    assert not (tmp_path / "x").exists()
    bad = json.loads((out / "config.json").read_text())
    bad["hidden_act"] = "silu"
    with pytest.raises(ValueError, match="hidden_act='silu'"):
        hf.model_config_from_hf(bad)
    with pytest.raises(SystemExit) as exit_info:
        convert.main(["from-hf", str(tmp_path / "missing"), "--out", str(tmp_path / "y")])
    assert exit_info.value.code == 2
