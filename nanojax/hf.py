"""Hugging Face format: a nanojax run <-> transformers' own `NanoChatForCausalLM` (model_type "nanochat",
transformers >= 5), so `AutoModelForCausalLM.from_pretrained(DIR)` and `AutoTokenizer.from_pretrained(DIR)` work.

    python -m nanojax.convert to-hf RUN_DIR [--step N] [--tokenizer DIR] --out DIR
    python -m nanojax.convert from-hf DIR --out RUN_DIR

An export is `config.json`, `model.safetensors` (float32, torch's (out, in) layout), `tokenizer.json` (the
run's BPE as a `tokenizers` byte-level BPE: same split pattern; merges in rank order, which is how tiktoken
merges) and `tokenizer_config.json` with a chat template that renders as `Tokenizer.render_conversation`.
Writing one needs `safetensors` and `tokenizers` only (`pip install -e '.[hf]'`); loading it needs torch.

Known differences: transformers splits `<|user_end|>` written inside a message into the
special token, nanojax encodes it as text; two consecutive text parts of one assistant message are
encoded separately by nanojax and as one string by the template.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import numpy as np

from nanojax.config import ModelConfig, default_config
from nanojax.tokenizer import SPECIAL_TOKENS, Tokenizer

# nanochat's state-dict names (nanojax.convert) -> NanoChatForCausalLM's
LAYER_NAMES = {"attn.c_q": "self_attn.q_proj", "attn.c_k": "self_attn.k_proj", "attn.c_v": "self_attn.v_proj",
               "attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
# ModelConfig fields that change only how nanojax computes, never the function: anything else that differs
# from the launch default is an architecture transformers' NanoChat cannot hold
RUNTIME_FIELDS = {"aspect_ratio", "scan_layers", "remat", "attention_impl", "compute_dtype", "param_dtype",
                  "loss_chunk_size"}
MAPPED_FIELDS = {"depth", "width", "n_head", "n_kv_head", "head_dim", "vocab_size", "seq_len", "rope_base",
                 "softcap", "mlp_ratio"}
RMS_NORM_EPS = float(np.finfo(np.float32).eps)  # torch's F.rms_norm default in float32, which nanojax uses

CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{%- set ns.system = message['content'] + '\n\n' -%}"
    "{%- elif message['role'] == 'user' -%}"
    "<|user_start|>{{ ns.system ~ message['content'] }}<|user_end|>{%- set ns.system = '' -%}"
    "{%- elif message['role'] == 'assistant' -%}<|assistant_start|>"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'python' -%}<|python_start|>{{ part['text'] }}<|python_end|>"
    "{%- elif part['type'] == 'python_output' -%}<|output_start|>{{ part['text'] }}<|output_end|>"
    "{%- else -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|assistant_end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant_start|>{%- endif -%}"
)


# -- model ------------------------------------------------------------------------------------------
def unrepresentable(cfg: ModelConfig) -> list[str]:
    """The options of `cfg` that NanoChatForCausalLM has no place for (e.g. the newer nanochat family's)."""
    default = ModelConfig.of(default_config().model)
    skip = RUNTIME_FIELDS | MAPPED_FIELDS
    return [f"model.{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg)
            if f.name not in skip and getattr(cfg, f.name) != getattr(default, f.name)]


def hf_config(cfg: ModelConfig, tok: Tokenizer) -> dict:
    end = tok.encode_special("<|assistant_end|>")
    return {
        "architectures": ["NanoChatForCausalLM"], "model_type": "nanochat", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.width, "intermediate_size": cfg.mlp_ratio * cfg.width,
        "num_hidden_layers": cfg.depth, "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.seq_len, "hidden_act": "relu2",
        "rms_norm_eps": RMS_NORM_EPS, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_base},
        "final_logit_softcapping": cfg.softcap if cfg.softcap > 0 else None, "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": tok.bos_token_id, "eos_token_id": [end, tok.bos_token_id],
        "pad_token_id": end, "tie_word_embeddings": False, "dtype": "float32", "use_cache": True,
    }


def model_config_from_hf(hf: dict):
    """nanojax config (launch defaults) holding the model of a NanoChat config.json; refuses what differs."""
    problems = []
    if hf.get("model_type") != "nanochat":
        problems.append(f"model_type {hf.get('model_type')!r} (expected 'nanochat')")
    for key, want in (("hidden_act", "relu2"), ("attention_bias", False), ("tie_word_embeddings", False)):
        if hf.get(key, want) != want:
            problems.append(f"{key}={hf[key]!r} (nanojax: {want!r})")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type {rope['rope_type']!r} (nanojax: default)")
    width, hidden = int(hf["hidden_size"]), int(hf["intermediate_size"])
    if hidden % width:
        problems.append(f"intermediate_size {hidden} is not a multiple of hidden_size {width}")
    if problems:
        raise ValueError("this Hugging Face model is not one nanojax can represent: " + "; ".join(problems))
    c = default_config()
    m = c.model
    m.depth, m.width = int(hf["num_hidden_layers"]), width
    m.n_head = int(hf["num_attention_heads"])
    m.n_kv_head = int(hf.get("num_key_value_heads") or m.n_head)
    m.head_dim = int(hf.get("head_dim") or width // m.n_head)
    m.vocab_size, m.seq_len = int(hf["vocab_size"]), int(hf.get("max_position_embeddings", m.seq_len))
    m.rope_base, m.mlp_ratio = float(rope.get("rope_theta", 10000.0)), hidden // width
    m.softcap = float(hf.get("final_logit_softcapping") or 0.0)
    ModelConfig.of(m)  # validates (e.g. heads that do not group)
    return c


def nanochat_to_hf_names(state_dict: dict) -> dict:
    out = {}
    for name, value in state_dict.items():
        if name == "transformer.wte.weight":
            out["model.embed_tokens.weight"] = value
        elif name == "lm_head.weight":
            out[name] = value
        else:  # transformer.h.{i}.attn.c_q.weight
            _, _, i, group, layer, _ = name.split(".")
            out[f"model.layers.{i}.{LAYER_NAMES[f'{group}.{layer}']}.weight"] = value
    return out


def hf_to_nanochat_names(state_dict: dict) -> dict:
    back = {v: k for k, v in LAYER_NAMES.items()}
    out = {}
    for name, value in state_dict.items():
        if name == "model.embed_tokens.weight":
            out["transformer.wte.weight"] = value
        elif name == "lm_head.weight":
            out[name] = value
        elif name.startswith("model.layers.") and ".".join(name.split(".")[3:5]) in back:
            i, sub = name.split(".")[2], ".".join(name.split(".")[3:5])
            out[f"transformer.h.{i}.{back[sub]}.weight"] = value
        else:
            raise ValueError(f"unexpected tensor {name!r} in the Hugging Face checkpoint (NanoChat has no such "
                             "weight; is it a newer-family model?)")
    return out


# -- tokenizer --------------------------------------------------------------------------------------
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level BPE vocabularies are written in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _ranks_and_merges(tok: Tokenizer) -> tuple[dict[bytes, int], list[tuple[bytes, bytes]]]:
    """The BPE ranks and, in rank order, every (left, right) pair that forms a ranked token."""
    enc = tok.encoding
    ranks = {enc.decode_single_token_bytes(i): i for i in range(tok.vocab_size - len(SPECIAL_TOKENS))}
    merges = []
    for token in ranks:  # built in rank order
        splits = [(token[:k], token[k:]) for k in range(1, len(token)) if token[:k] in ranks and token[k:] in ranks]
        merges += sorted(splits, key=lambda lr: (ranks[lr[0]], ranks[lr[1]]))
    return ranks, merges


def tokenizer_json(tok: Tokenizer) -> str:
    """The run's tokenizer as a `tokenizers` JSON: split regex, byte-level BPE, specials as added tokens."""
    from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    u = _bytes_to_unicode()
    text = lambda b: "".join(u[x] for x in b)  # noqa: E731
    ranks, merges = _ranks_and_merges(tok)
    bpe = models.BPE({text(b): r for b, r in ranks.items()}, [(text(a), text(b)) for a, b in merges],
                     fuse_unk=False, ignore_merges=True)
    hf = HFTokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(tok.encoding._pat_str), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(name, normalized=False, special=True) for name in SPECIAL_TOKENS])
    return hf.to_str(pretty=True)


def tokenizer_from_json(path: pathlib.Path) -> Tokenizer:
    """A nanojax Tokenizer from an exported `tokenizer.json`; refuses one whose merges are not rank order."""
    spec = json.loads(path.read_text())
    model, inverse = spec.get("model") or {}, {c: b for b, c in _bytes_to_unicode().items()}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; nanojax reads byte-level BPE tokenizers")
    ranks = {bytes(inverse[c] for c in s): r for s, r in model["vocab"].items()}
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", [])}
    want = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
    if specials != want:
        raise ValueError(f"{path}: special tokens {specials} differ from nanochat's {want}")
    splits = [p for p in (spec.get("pre_tokenizer") or {}).get("pretokenizers", []) if p.get("type") == "Split"]
    if len(splits) != 1 or "Regex" not in splits[0].get("pattern", {}):
        raise ValueError(f"{path}: expected one Split(Regex) pre-tokenizer before ByteLevel")
    tok = Tokenizer.from_ranks(ranks, splits[0]["pattern"]["Regex"], info={"source": str(path)})
    u = _bytes_to_unicode()
    derived = [" ".join("".join(u[x] for x in piece) for piece in m) for m in _ranks_and_merges(tok)[1]]
    given = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if derived != given:
        raise ValueError(f"{path}: its merges are not in vocabulary-rank order, so tiktoken would tokenize "
                         "differently; nanojax imports only tokenizers it can reproduce exactly")
    return tok


def tokenizer_config(tok: Tokenizer, seq_len: int) -> dict:
    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|assistant_end|>",
            "pad_token": "<|assistant_end|>", "model_max_length": seq_len, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "chat_template": CHAT_TEMPLATE}


# -- whole exports ------------------------------------------------------------------------------------
def write_export(out_dir, cfg: ModelConfig, tensors: dict[str, np.ndarray], tok: Tokenizer) -> pathlib.Path:
    """config.json, model.safetensors, tokenizer.json and tokenizer_config.json under `out_dir`."""
    from safetensors.numpy import save_file

    bad = unrepresentable(cfg)
    if bad:
        raise ValueError(f"transformers' NanoChat cannot represent {', '.join(bad)}; export the model as a nanojax "
                         "run (or to-nanochat) instead")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(hf_config(cfg, tok), indent=2) + "\n")
    (out / "tokenizer.json").write_text(tokenizer_json(tok))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, cfg.seq_len), indent=2) + "\n")
    return out


def read_export(src_dir) -> tuple[dict, dict[str, np.ndarray], Tokenizer]:
    """(nanojax config, nanochat-named state dict, tokenizer) of a NanoChat Hugging Face directory."""
    from safetensors.numpy import load_file

    src = pathlib.Path(src_dir)
    for name in ("config.json", "tokenizer.json"):
        if not (src / name).is_file():
            raise FileNotFoundError(f"{src / name} not found (a Hugging Face model directory has config.json, "
                                    "model.safetensors and tokenizer.json)")
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors under {src} (nanojax reads safetensors weights only)")
    hf = json.loads((src / "config.json").read_text())
    config = model_config_from_hf(hf)
    eps = float(hf.get("rms_norm_eps", RMS_NORM_EPS))
    if abs(eps - RMS_NORM_EPS) > 1e-9:
        print(f"note: {src / 'config.json'} has rms_norm_eps={eps:g}; nanojax normalises with float32's epsilon "
              f"({RMS_NORM_EPS:.3g}), as nanochat does", flush=True)
    tensors: dict = {}
    for f in files:
        tensors.update(load_file(str(f)))
    return config, hf_to_nanochat_names(tensors), tokenizer_from_json(src / "tokenizer.json")
