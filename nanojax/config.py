"""The config schema: defaults, validation and every derived size, computed in one place.

Every tool takes `--config=configs/X.py` (a file whose `get_config()` returns a ConfigDict built on
`default_config()`) plus `--config.a.b=value` overrides. The defaults are nanochat's launch d20 recipe.
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
import importlib.util
import math
import os
import pathlib
import re

import ml_collections

from nanojax.chips import peak_flops
from nanojax.data.kinds import EPOCH_KINDS, canonical_kind


def load_config_file(path) -> ml_collections.ConfigDict:
    """`get_config()` of a configs/*.py file given by path (lets one config build on another)."""
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} not found")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.run_name = "base_d20"
    c.run_dir = ""  # "" -> $NANOJAX_HOME/runs/<run_name>
    c.seed = 0

    c.model = ml_collections.ConfigDict()
    m = c.model
    m.depth = 20
    m.aspect_ratio = 64  # width = aspect_ratio * depth (nanochat launch)
    m.head_dim = 128
    m.width = -1  # -1: derived
    m.n_head = -1  # -1: ceil(width / head_dim)
    m.n_kv_head = -1  # -1: n_head (no grouping)
    m.vocab_size = 65536
    m.seq_len = 2048
    m.rope_base = -1.0  # -1: the family's (launch 10,000, head 100,000)
    m.softcap = 15.0
    m.mlp_ratio = 4
    m.scan_layers = True  # nnx.scan over stacked layers (False: a Python loop, same numbers)
    # none | full | dots (save matmul outputs, recompute the rest) | auto: none on CPU; on an accelerator the
    # cheapest of none, dots, full whose compiled step fits the device's memory (XLA's analysis: nanojax.remat)
    m.remat = "auto"
    m.attention_impl = "auto"  # auto | xla | cudnn (GPU) | splash (TPU; interpreted elsewhere): nanojax.attention
    m.compute_dtype = "auto"  # auto: float32 on CPU, bfloat16 on accelerators
    m.param_dtype = "float32"
    # positions per row per loss chunk (float32 logits exist for B×P×V at a time, recomputed in the backward);
    # 0: auto, the whole sequence when a device's logits fit 256 MiB (no recompute), else 128
    m.loss_chunk_size = 0
    # model family: "launch" (nanochat 3a5e0bc) or "head" (nanochat 92d63d4). It fills every key below left at
    # its "family" value (-1 / "family"); set a key explicitly to mix (nanojax.model_head has the HEAD pieces)
    m.family = "launch"
    m.window_pattern = "family"  # tiled over layers: L = full context, S = short window; the last layer is L
    m.value_embeds = -1  # 1: value embeddings + gates on alternating layers (last included); 0: none
    m.smear = -1  # 1: previous-token mix into each embedding (decode reads it from the cache); 0: none
    m.backout = -1  # 1: subtract λ·(residual after layer depth//2) before the final norm; 0: none
    m.layer_lambdas = -1  # 1: per-layer resid_lambdas / x0_lambdas (x ← r·x + a·x0 before each block); 0: none
    m.qk_scale = -1.0  # queries and keys × this after QK-norm (launch 1.0, head 1.2)
    m.vocab_multiple = -1  # embedding / lm_head rows padded to a multiple of this (logits sliced back)
    m.init = "family"  # launch | head: the weight initialisation

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1
    c.mesh.fsdp = -1  # -1: the rest of the devices
    c.mesh.tensor = 1
    c.mesh.num_devices = -1  # -1: every device; N: the first N (e.g. a 1-device run on a bigger host)

    c.train = ml_collections.ConfigDict()
    t = c.train
    t.total_batch_size = 524_288  # tokens per optimizer step
    t.device_batch_size = 32  # rows per device per micro-step
    t.num_iterations = -1  # -1: from target_param_data_ratio (data.kind sft / mid: one epoch, counted at start)
    t.target_param_data_ratio = 20.0
    t.warmup_ratio = 0.0
    t.warmdown_ratio = 0.2
    t.final_lr_frac = 0.0
    t.grad_clip = 1.0  # global norm; 0 disables
    t.log_every = 10
    t.eval_every = 250  # steps; 0 disables
    t.eval_tokens = 20 * 524_288
    # evaluations in the run (nanojax.train_evals), also at the last step; 0 disables
    t.core_every = 0  # CORE every N steps (nanochat's base_train.py: 2000)
    t.core_max_per_task = 500  # examples per CORE task (base_train.py: 500; -1: all)
    t.eval_bundle = ""  # CORE eval bundle directory ("": downloaded once to $NANOJAX_HOME/data/eval_bundle)
    t.chatcore_every = 0  # ChatCORE: ARC-E/C, MMLU, GSM8K, HumanEval every N steps (HEAD's chat_sft.py: 200)
    t.chatcore_max_categorical = -1  # problems per categorical task (-1: all, as HEAD)
    t.chatcore_max_generative = 24  # problems per generative task (HEAD: 24)
    t.chatcore_tasks = ""  # "": ChatCORE's five; or a subset, e.g. "mmlu, gsm8k" (a partial ChatCORE)
    t.checkpoint_every = 1000  # steps; 0: only the final checkpoint (and on SIGTERM)
    t.max_to_keep = 2
    t.async_checkpointing = True
    t.init_from = ""  # run dir or checkpoint dir: load parameters only (next stage)
    t.init_from_step = -1  # -1: latest
    t.init_optimizer_state = False  # also load the optimizer state from init_from
    t.stop_after_steps = -1  # stop (with a checkpoint) after this many steps of this process; for tests
    t.profile = ""  # "START:STOP": a jax.profiler trace of those steps under <run>/profile (nanojax.profiling)
    t.loggers = "jsonl"  # metrics sinks: jsonl (metrics.jsonl, always) plus tensorboard and/or wandb; nanojax.loggers
    t.wandb_project = "nanojax"

    c.optim = ml_collections.ConfigDict()
    o = c.optim
    o.embedding_lr = 0.2
    o.unembedding_lr = 0.004
    o.matrix_lr = 0.02
    o.lr_scale = 1.0  # multiplies every group's LR (SFT uses 0.02)
    o.scale_lr_by_width = True  # AdamW LRs x (width/768)^-0.5, as nanochat
    o.adam_b1 = 0.8
    o.adam_b2 = 0.95
    o.adam_eps = 1e-10
    o.weight_decay = 0.0
    o.muon_momentum_start = 0.85
    o.muon_momentum_end = 0.95
    o.muon_momentum_warmup_steps = 300
    o.ns_steps = 5
    o.ns_coeffs = (3.4445, -4.7750, 2.0315)
    o.ns_dtype = "bfloat16"
    # optimizer family: "launch" (nanochat 3a5e0bc: Muon + AdamW, global-norm clip) or "head" (nanochat 92d63d4's
    # MuonAdamW: nanojax.optim_head). The keys below are read by "head" only; it reuses the LRs, weight_decay
    # (Muon's, before HEAD's depth/batch scaling and cosine schedule), muon_momentum_* and ns_* keys above
    o.kind = "launch"
    o.scalar_lr = 0.5  # head: resid_lambdas at 0.01x this, x0_lambdas at 1x
    o.muon_beta2 = 0.9  # head: decay of NorMuon's per-row/column second moment
    o.muon_momentum_final = 0.90  # head: Muon momentum at the end of the LR warmdown (from muon_momentum_end)
    o.warmup_steps = -1  # head: LR warmup in steps (HEAD: 40); -1: round(train.warmup_ratio × iterations)
    o.scale_lr_by_batch = True  # head: LRs × √(batch/2^19), as base_train.py (HEAD's chat_sft.py does not)

    c.data = ml_collections.ConfigDict()
    d = c.data
    d.kind = "synthetic"  # synthetic | fineweb | mid (midtraining) | sft (old name: chat) | rl; nanojax.data.kinds
    d.path = ""  # shard directory ("" -> $NANOJAX_HOME/data/fineweb)
    d.tokenizer_dir = ""  # "" -> $NANOJAX_HOME/tokenizer
    d.seed = 0
    d.num_shards = -1  # -1: every shard in data.path; N: shards 0..N-1 (+ the validation shard), fetched if missing
    d.read_threads = 2  # row groups read + tokenized at once
    d.tokenizer_threads = 2  # tiktoken threads (more than the host's cores only slows it down)
    d.prefetch = 2  # batches kept ready by a background thread
    d.worker_count = 0  # grain worker processes (0: threads only, fastest on small hosts)
    d.shuffle = True  # shuffle training row groups (per epoch, seeded)
    d.dataset = "fineweb"  # pretraining shards: fineweb (FineWeb-Edu, nanochat launch) | climbmix (ClimbMix, HEAD)
    d.packing = "concat"  # concat (launch: rows cut from the token stream) | bestfit (HEAD: BOS-aligned best fit)
    d.bestfit_buffer = 1000  # documents the best-fit packer chooses from (HEAD: 1000)
    # (kind sft: packing concat = launch's one conversation per padded row, bestfit = HEAD's packed rows)
    d.sft_bestfit_buffer = 100  # conversations the SFT best-fit packer chooses from (HEAD: 100)
    # conversation stages (kind sft, mid = midtraining; see nanojax/data/chat.py)
    d.train_tasks = ""  # task mixture, e.g. "smoltalk:train, mmlu/auxiliary_train:train, gsm8k/main:train"
    d.val_tasks = ""  # e.g. "smoltalk:test"
    d.task_sources = ""  # local data instead of the HF hub: "gsm8k=/data/gsm8k, smoltalk=/data/smoltalk"
    d.mixture_seed = 42  # TaskMixture shuffle (nanochat: 42)
    d.skip_bad_rows = False  # True: skip (and count) conversations that break the format instead of failing
    d.pad_lengths = ""  # SFT row lengths, "a,b,...": "" = powers of two from 64 up to seq_len, plus seq_len

    # stage 3, data.kind=rl (nanojax.rl): questions from data.train_tasks, pass@k on data.val_tasks every
    # train.eval_every steps; train.total_batch_size is derived: examples_per_step × num_samples rows of seq_len
    c.rl = ml_collections.ConfigDict()
    r = c.rl
    r.examples_per_step = 16  # questions per optimizer step, over all hosts (each host samples its own share)
    r.num_samples = 16  # replies per question, sharing one prefill; advantage = reward − their mean reward
    r.max_new_tokens = 256
    r.temperature = 1.0
    r.top_k = 50  # 0: sample from the whole vocabulary
    r.num_epochs = 1  # with train.num_iterations=-1: num_epochs × questions // examples_per_step steps
    r.sample_rows = 256  # sequences per engine call (bounds the KV cache); at least num_samples and eval_samples
    r.eval_examples = 400  # pass@k on the first eval_examples questions of data.val_tasks
    r.eval_samples = 8  # k = 1 .. eval_samples (sampled at rl.temperature, rl.top_k)
    c.lock()  # unknown keys fail, naming the key
    return c


def use_nanochat_head(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """nanochat HEAD (92d63d4)'s recipe on a config: its model family, its MuonAdamW with scripts/base_train.py's
    defaults (no clipping, warmup 40 steps, warmdown 0.65 to 0.05, momentum 0.85 → 0.97 → 0.90, weight decay
    0.28, the automatic batch size, data:param ratio 12), ClimbMix with best-fit packing, a 32,768 vocabulary."""
    c.model.family = "head"
    c.model.vocab_size = 32768
    c.optim.kind = "head"
    c.optim.embedding_lr, c.optim.unembedding_lr, c.optim.weight_decay = 0.3, 0.008, 0.28
    c.optim.muon_momentum_end, c.optim.muon_momentum_warmup_steps, c.optim.warmup_steps = 0.97, 400, 40
    t = c.train
    t.grad_clip, t.warmdown_ratio, t.final_lr_frac, t.target_param_data_ratio = 0.0, 0.65, 0.05, 12.0
    t.total_batch_size = -1
    c.data.dataset, c.data.packing = "climbmix", "bestfit"
    return c


def use_nanochat_head_sft(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """HEAD's SFT (scripts/chat_sft.py) on a pretraining config whose model, batch and LRs it keeps (HEAD inherits
    them from the checkpoint): best-fit packed conversations, one epoch, every LR x 0.8 (--init-lr-frac) and not
    scaled by the batch, no warmup, the last half to 0, Muon weight decay 0, Muon momentum 0.85 -> 0.95 over 300
    steps, the optimizer's momenta warm-started from train.init_from (--load-optimizer=1), ChatCORE every 200
    steps."""
    c.data.kind, c.data.packing = "sft", "bestfit"
    t, o = c.train, c.optim
    t.init_optimizer_state, t.num_iterations = True, -1
    t.warmdown_ratio, t.final_lr_frac = 0.5, 0.0
    t.core_every, t.chatcore_every = 0, 200  # ChatCORE every 200 steps (all categorical problems, 24 generative)
    o.lr_scale, o.scale_lr_by_batch, o.warmup_steps, o.weight_decay = 0.8, False, 0, 0.0
    o.muon_momentum_start, o.muon_momentum_end, o.muon_momentum_final = 0.85, 0.95, 0.95
    o.muon_momentum_warmup_steps = 300
    return c


@dataclasses.dataclass(frozen=True)
class Derived:
    """Sizes that follow from the config and the device count; printed at start-up."""

    num_params: int
    num_embedding_params: int
    flops_per_token: float
    num_devices: int
    data_parallel: int
    grad_accum_steps: int
    global_micro_batch: int  # rows per micro-step across all devices
    num_iterations: int
    total_tokens: int

    def mfu(self, tokens_per_s: float, device_kind: str) -> float | None:
        """Model FLOPs utilisation: achieved FLOP/s over the devices' dense bf16 peak (None: peak unknown)."""
        peak = peak_flops(device_kind)
        return self.flops_per_token * tokens_per_s / (peak * self.num_devices) if peak else None

    def summary(self) -> str:
        return "\n".join(
            [
                f"parameters:        {self.num_params:,} ({self.num_embedding_params:,} in the embedding)",
                f"FLOPs per token:   {self.flops_per_token:.4e}",
                f"devices:           {self.num_devices} (data-parallel {self.data_parallel})",
                f"micro-batch:       {self.global_micro_batch} rows, grad accumulation {self.grad_accum_steps}",
                f"iterations:        {self.num_iterations:,}",
                f"training tokens:   {self.total_tokens:,}",
                f"total FLOPs:       {self.flops_per_token * self.total_tokens:.4e}",
            ]
        )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The model's static facts, typed, frozen and hashable (jit and NNX treat it as static); `ModelConfig.of`
    builds it from `config.model`, the one place where sizes follow from depth.

    Shape letters in tensor names (`x_BTD`), one meaning each:
      B  rows of a batch                           L  layers (depth)
      T  positions of this call (the queries)      S  key/value positions: cache slots, or T without a cache
      D  model width                               V  vocabulary
      H  query heads                               K  key/value heads
      G  query heads per key/value head (H/K)      E  head dimension
      F  RoPE frequencies (E/2)                    M  MLP hidden width (mlp_ratio·D)
      C  loss chunks along the sequence            P  positions per loss chunk (loss_chunk_size)
      N  any number of leading axes
    """

    depth: int
    aspect_ratio: int
    head_dim: int
    width: int
    n_head: int
    n_kv_head: int
    vocab_size: int
    seq_len: int
    rope_base: float
    softcap: float
    mlp_ratio: int
    scan_layers: bool
    remat: str
    attention_impl: str
    compute_dtype: str
    param_dtype: str
    loss_chunk_size: int
    family: str = "launch"
    window_pattern: str = "L"
    value_embeds: bool = False
    smear: bool = False
    backout: bool = False
    layer_lambdas: bool = False
    qk_scale: float = 1.0
    vocab_multiple: int = 1
    init: str = "launch"

    @classmethod
    def of(cls, m) -> ModelConfig:
        """From `config.model` (a ConfigDict or dict, possibly saved by an older nanojax: missing keys take
        today's defaults; unknown keys are an error naming them). Depth drives size (nanochat launch):
        width = aspect_ratio·depth, heads of head_dim, ceil(width / head_dim) of them, no grouping."""
        if isinstance(m, ModelConfig):
            return m
        values = _model_defaults()
        given = m.to_dict() if isinstance(m, ml_collections.ConfigDict) else dict(m)
        unknown = sorted(set(given) - set(values))
        if unknown:
            raise ValueError(f"config.model has unknown key(s) {unknown}; known: {sorted(values)}")
        values.update(given)
        if values["width"] <= 0:
            values["width"] = values["aspect_ratio"] * values["depth"]
        if values["n_head"] <= 0:
            values["n_head"] = math.ceil(values["width"] / values["head_dim"])
        if values["n_kv_head"] <= 0:
            values["n_kv_head"] = values["n_head"]
        _fill_family(values)
        mc = cls(**values)
        if mc.n_head % mc.n_kv_head:
            raise ValueError(f"model.n_head={mc.n_head} must be a multiple of model.n_kv_head={mc.n_kv_head}")
        if mc.remat not in ("auto", "none", "full", "dots"):
            raise ValueError(f"model.remat={mc.remat!r}: expected one of auto, none, full, dots")
        return mc

    @property
    def padded_vocab(self) -> int:
        """Rows of the embedding and lm_head: vocab_size rounded up to vocab_multiple (logits are sliced back)."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def layer_windows(self) -> tuple[int | None, ...]:
        """Each layer's attention window (None: full context), nanochat HEAD's rule: window_pattern tiled over
        the layers, S = a quarter of seq_len rounded up to 128, the last layer always full."""
        short = -(-self.seq_len // 4 // 128) * 128
        pattern = self.window_pattern.upper()
        windows = [short if pattern[i % len(pattern)] == "S" and short < self.seq_len else None
                   for i in range(self.depth)]
        windows[-1] = None
        return tuple(windows)

    def ve_layers(self) -> tuple[int, ...]:
        """Layers with a value embedding (HEAD: alternating, the last included); index j of the stack is layer
        ve_layers()[j]."""
        if not self.value_embeds:
            return ()
        return tuple(i for i in range(self.depth) if i % 2 == (self.depth - 1) % 2)

    def param_counts(self) -> tuple[int, int]:
        """(total, embedding) parameter counts, from the shapes alone; embedding = the lookup tables."""
        d, L, V = self.width, self.depth, self.padded_vocab
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        n_ve = len(self.ve_layers())
        attn = d * q + 2 * d * kv + q * d
        mlp = 2 * d * self.mlp_ratio * d
        lookup = V * d + n_ve * V * kv
        extras = n_ve * VE_GATE_CHANNELS * self.n_kv_head + 2 * L * self.layer_lambdas
        extras += (SMEAR_CHANNELS + 1) * self.smear + self.backout
        return lookup + L * (attn + mlp) + d * V + extras, lookup

    def num_matmul_params(self) -> int:
        """Parameters that multiply the token stream (2 FLOPs each forward): HEAD's `num_matmul_params`."""
        d, L = self.width, self.depth
        q, kv = self.n_head * self.head_dim, self.n_kv_head * self.head_dim
        gates = len(self.ve_layers()) * VE_GATE_CHANNELS * self.n_kv_head + SMEAR_CHANNELS * self.smear
        return L * (2 * d * q + 2 * d * kv + 2 * d * self.mlp_ratio * d) + d * self.padded_vocab + gates

    def flops_per_token(self) -> float:
        """nanochat's estimate: 6·(matmul params) + Σ_layers 12·H·E·min(window, T) (attention scores and values);
        at launch (no windows, no gates) this is 6·(params − embedding) + 12·L·H·E·T."""
        attn = sum(12 * self.n_head * self.head_dim * min(w or self.seq_len, self.seq_len)
                   for w in self.layer_windows())
        return 6 * self.num_matmul_params() + attn


VE_GATE_CHANNELS = 12  # HEAD's value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # HEAD's smear gate reads the first 24 channels of the embedding
FAMILIES = {  # what each "family" key (−1 / "family") becomes
    "launch": dict(window_pattern="L", value_embeds=0, smear=0, backout=0, layer_lambdas=0, qk_scale=1.0,
                   rope_base=10000.0, vocab_multiple=1, init="launch"),
    "head": dict(window_pattern="SSSL", value_embeds=1, smear=1, backout=1, layer_lambdas=1, qk_scale=1.2,
                 rope_base=100000.0, vocab_multiple=64, init="head"),
}


def _fill_family(values: dict) -> None:
    """Replace the family placeholders in `values` (config.model as a dict) by the family's choices."""
    family = values.get("family", "launch")
    if family not in FAMILIES:
        raise ValueError(f"model.family={family!r}: expected one of {', '.join(FAMILIES)}")
    for key, chosen in FAMILIES[family].items():
        if values.get(key) in (-1, -1.0, "family", None):
            values[key] = chosen
    for key in ("value_embeds", "smear", "backout", "layer_lambdas"):
        if values[key] not in (0, 1, False, True):
            raise ValueError(f"model.{key}={values[key]!r}: expected -1 (the family's), 0 or 1")
        values[key] = bool(values[key])
    pattern = str(values["window_pattern"]).upper()
    if not pattern or set(pattern) - set("SL"):
        raise ValueError(f"model.window_pattern={values['window_pattern']!r}: use only S and L")
    values["window_pattern"] = pattern


@functools.lru_cache(maxsize=1)
def _model_default_items() -> tuple:
    return tuple(default_config().model.to_dict().items())


def _model_defaults() -> dict:
    """config.model's defaults, built once: `ModelConfig.of` runs on every logged step (the LR readout)."""
    return dict(_model_default_items())


def fill_model_sizes(m: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Write the derived sizes (width, heads) and the family's choices into `config.model`, so config.json and
    checkpoints show them (and keep meaning the same model if a family's defaults ever change)."""
    mc = ModelConfig.of(m)
    with m.unlocked():
        m.width, m.n_head, m.n_kv_head = mc.width, mc.n_head, mc.n_kv_head
        for key in FAMILIES["launch"]:
            value = getattr(mc, key)
            setattr(m, key, int(value) if isinstance(value, bool) else value)
    return m


def count_params(m) -> tuple[int, int]:
    """(total, embedding) parameter counts of `config.model`."""
    return ModelConfig.of(m).param_counts()


def flops_per_token(m) -> float:
    return ModelConfig.of(m).flops_per_token()


def mesh_shape(mesh_cfg, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor); one −1 entry takes the rest of the devices."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise ValueError(f"mesh: at most one axis may be -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}")
    known = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"mesh: axis sizes must be positive or -1, got {sizes}")
    if unknown:
        if num_devices % known:
            raise ValueError(
                f"mesh: {num_devices} devices cannot be split with fixed axes of product {known} ({sizes})")
        sizes[unknown[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ValueError(
            f"mesh: data×fsdp×tensor = {sizes[0]}×{sizes[1]}×{sizes[2]} = {math.prod(sizes)} "
            f"but there are {num_devices} devices"
        )
    return tuple(sizes)


# -- validation: one table, one line per bad value --------------------------------------------------
_GE1 = (lambda v: v >= 1, "≥ 1")
_ALL = (lambda v: v == -1 or v >= 1, "≥ 1, or -1 (all)")
_GE0 = (lambda v: not v < 0, "≥ 0")  # a NaN learning rate passes: the loop stops it at step 1 (non-finite, exit 1)
_GT0 = (lambda v: v > 0, "> 0")
_AUTO = (lambda v: v == -1 or v >= 1, "≥ 1, or -1 (derived)")
_FRACTION = (lambda v: 0 <= v <= 1, "between 0 and 1")
_BETA = (lambda v: 0 <= v < 1, "in [0, 1)")
_DTYPES = ("float32", "bfloat16", "float16")


def _one_of(*choices):
    return lambda v: v in choices, "one of " + ", ".join(choices)


def _profile_range(v) -> bool:
    from nanojax.profiling import parse_range  # lazy: profiling imports jax, config stays light

    try:
        parse_range(v)
    except ValueError:
        return False
    return True


def _known_kind(v) -> bool:
    canonical_kind(v)  # raises its own message, listing the kinds
    return True


# key -> (test, what it must be). Keys a config lacks (one saved by an older nanojax) are skipped.
RULES = {
    "run_name": (lambda v: bool(v) and "/" not in v, "a non-empty name without '/'"),
    "model.depth": _GE1, "model.aspect_ratio": _GE1, "model.head_dim": _GE1, "model.vocab_size": _GE1,
    "model.seq_len": _GE1, "model.mlp_ratio": _GE1, "model.loss_chunk_size": _GE0,
    "model.width": _AUTO, "model.n_head": _AUTO, "model.n_kv_head": _AUTO,
    "model.rope_base": (lambda v: v == -1 or v > 0, "> 0, or -1 (the family's)"), "model.softcap": _GT0,
    "model.family": _one_of("launch", "head"), "model.init": _one_of("family", "launch", "head"),
    "model.window_pattern": (lambda v: v == "family" or (bool(v) and set(v.upper()) <= set("SL")),
                             "\"family\" or a non-empty string of S and L"),
    **dict.fromkeys(("model.value_embeds", "model.smear", "model.backout", "model.layer_lambdas"),
                    (lambda v: v in (-1, 0, 1), "-1 (the family's), 0 or 1")),
    "model.qk_scale": (lambda v: v == -1 or v > 0, "> 0, or -1 (the family's)"),
    "model.vocab_multiple": (lambda v: v == -1 or v >= 1, "≥ 1, or -1 (the family's)"),
    "model.remat": _one_of("auto", "none", "full", "dots"),
    "model.attention_impl": _one_of("auto", "xla", "cudnn", "splash"),
    "model.compute_dtype": _one_of("auto", *_DTYPES), "model.param_dtype": _one_of(*_DTYPES),
    **dict.fromkeys(("mesh.data", "mesh.fsdp", "mesh.tensor"), (_AUTO[0], "≥ 1, or -1 (the rest of the devices)")),
    "mesh.num_devices": (_AUTO[0], "≥ 1, or -1 (every device)"),
    "train.total_batch_size": (lambda v: v == -1 or v >= 1, "≥ 1, or -1 (optim.kind='head': automatic)"),
    "train.device_batch_size": _GE1,
    "train.num_iterations": (lambda v: v == -1 or v >= 1, "> 0, or -1 to derive it from train.target_param_data_ratio"),
    "train.target_param_data_ratio": _GE0, "train.warmup_ratio": _FRACTION, "train.warmdown_ratio": _FRACTION,
    "train.final_lr_frac": _FRACTION, "train.grad_clip": _GE0, "train.log_every": _GE1,
    "train.eval_every": (lambda v: v >= 0, "≥ 0 (0: no evaluation)"), "train.eval_tokens": _GE0,
    "train.checkpoint_every": (lambda v: v >= 0, "≥ 0 (0: only the final checkpoint)"),
    "train.core_every": _GE0, "train.chatcore_every": _GE0, "train.core_max_per_task": _ALL,
    "train.chatcore_max_categorical": _ALL, "train.chatcore_max_generative": _ALL,
    "train.max_to_keep": _GE1, "train.init_from_step": (lambda v: v >= -1, "≥ 0, or -1 (latest)"),
    "train.stop_after_steps": (lambda v: v == -1 or v >= 1, "≥ 1, or -1 (no early stop)"),
    "train.profile": (_profile_range, "\"\" or START:STOP with 1 ≤ START ≤ STOP"),
    "optim.embedding_lr": _GE0, "optim.unembedding_lr": _GE0, "optim.matrix_lr": _GE0, "optim.lr_scale": _GE0,
    "optim.weight_decay": _GE0, "optim.adam_eps": _GE0, "optim.adam_b1": _BETA, "optim.adam_b2": _BETA,
    "optim.muon_momentum_start": _BETA, "optim.muon_momentum_end": _BETA,
    "optim.muon_momentum_warmup_steps": _GE0, "optim.ns_steps": _GE0, "optim.ns_dtype": _one_of(*_DTYPES),
    "optim.kind": _one_of("launch", "head"), "optim.scalar_lr": _GE0, "optim.muon_beta2": _BETA,
    "optim.muon_momentum_final": _BETA, "optim.warmup_steps": (lambda v: v >= -1, "≥ 0, or -1 (train.warmup_ratio)"),
    "data.kind": (_known_kind, "a known data pipeline"),
    "data.num_shards": (lambda v: v == -1 or v >= 1, "≥ 1, or -1 (every shard in data.path)"),
    "data.read_threads": _GE1, "data.tokenizer_threads": _GE1, "data.prefetch": _GE0, "data.worker_count": _GE0,
    "data.dataset": _one_of("fineweb", "climbmix"), "data.packing": _one_of("concat", "bestfit"),
    "data.bestfit_buffer": _GE1, "data.sft_bestfit_buffer": _GE1,
    "rl.examples_per_step": _GE1, "rl.num_samples": _GE1, "rl.max_new_tokens": _GE1, "rl.temperature": _GE0,
    "rl.top_k": (lambda v: v >= 0, "≥ 0 (0: no top-k)"), "rl.num_epochs": _GE1, "rl.sample_rows": _GE1,
    "rl.eval_examples": _GE0, "rl.eval_samples": _GE1,
}


def _lookup(config, dotted: str):
    """The value at "a.b" of a ConfigDict or dict; KeyError when absent."""
    value = config
    for part in dotted.split("."):
        if not hasattr(value, "keys") or part not in value.keys():
            raise KeyError(dotted)
        value = value[part]
    return value


def _type_error(key: str, value, default) -> str | None:
    """What is wrong with the type of `value`, given the default's type (int is fine for a float)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif isinstance(default, (tuple, list)):
        ok = isinstance(value, (tuple, list))
    else:
        ok = isinstance(value, type(default))
    return None if ok else (f"config.{key}={value!r}: expected {type(default).__name__}, "
                            f"got {type(value).__name__}")


def validate(config) -> None:
    """ValueError, one line naming every bad key and what it must be, for a config whose values would fail
    later (a division by zero, an empty iterator) or, worse, be reinterpreted silently (num_iterations=0 meaning
    'derive it'). Types follow `default_config()`; ranges and choices follow `RULES`."""
    problems = []
    for key, default in _default_items():
        try:
            value = _lookup(config, key)
        except KeyError:
            continue
        problem = _type_error(key, value, default)
        if problem is None and key in RULES:
            test, must = RULES[key]
            try:
                ok = test(value)
            except ValueError as e:
                problem = str(e)
            else:
                problem = None if ok else f"config.{key}={value!r} must be {must}"
        if problem:
            problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))


@functools.lru_cache(maxsize=1)
def _default_items() -> tuple:
    """(dotted key, default value) of every leaf of `default_config()`."""
    def flat(c, prefix):
        for k, v in c.items():
            yield from flat(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [(prefix + k, v)]
    return tuple(flat(default_config(), ""))


def unknown_key(config, dotted: str, root: str = "config") -> str | None:
    """Why `<root>.<dotted>` names no key (with the nearest spelling when one is close), or None if it does."""
    value, seen = config, root
    for part in dotted.split("."):
        keys = list(value.keys()) if hasattr(value, "keys") else None
        if keys is None:
            return f"{seen} is a value, not a group: there is no {seen}.{part}"
        if part not in keys:
            close = difflib.get_close_matches(part, keys, n=1)
            hint = f"; did you mean {seen}.{close[0]}?" if close else f" (its keys: {', '.join(sorted(keys))})"
            return f"{seen}.{part} is not a config key{hint}"
        value, seen = value[part], f"{seen}.{part}"
    return None


def save_run_config(config, log_dir) -> str | None:
    """Write `<log_dir>/config.json` (atomically: a temporary file, then `os.replace`). A different config.json
    already there (a resume with changed values) is first copied to `config.<n>.json`, n = 1, 2, ... in order,
    and that path returned; nothing is ever overwritten unkept. Call it once the inputs are known to be good."""
    log_dir = pathlib.Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    path, text, kept = log_dir / "config.json", config.to_json_best_effort(indent=2), None
    if path.exists():
        old = path.read_bytes()
        if old != text.encode():
            taken = [int(m.group(1)) for f in log_dir.glob("config.*.json")
                     if (m := re.fullmatch(r"config\.(\d+)\.json", f.name))]
            kept = log_dir / f"config.{max(taken, default=0) + 1}.json"
            kept.write_bytes(old)
    tmp = log_dir / f".config.json.tmp-{os.getpid()}"
    tmp.write_text(text)
    os.replace(tmp, path)
    return str(kept) if kept else None


def derive(config: ml_collections.ConfigDict, num_devices: int) -> Derived:
    """Validate the config against the device count and compute everything that follows from it."""
    validate(config)
    m = ModelConfig.of(fill_model_sizes(config.model))
    t = config.train
    if config.optim.get("kind", "launch") == "head":  # HEAD's batch size and horizon from the model's size
        from nanojax.optim_head import fill_head_batch  # (lazy: it imports the model, which imports this)

        fill_head_batch(config)
    elif t.total_batch_size == -1:
        raise ValueError("train.total_batch_size=-1 (automatic, nanochat HEAD's rule) needs optim.kind='head'")
    data, fsdp, _ = mesh_shape(config.mesh, num_devices)
    dp = data * fsdp
    micro_rows = t.device_batch_size * dp
    tokens_per_micro = micro_rows * m.seq_len
    if t.total_batch_size % tokens_per_micro:
        raise ValueError(
            f"train.total_batch_size={t.total_batch_size:,} tokens is not divisible by device_batch_size "
            f"{t.device_batch_size} × seq_len {m.seq_len} × data-parallel {dp} = {tokens_per_micro:,} tokens per "
            f"micro-step; change one of them"
        )
    accum = t.total_batch_size // tokens_per_micro
    total, embedding = m.param_counts()
    if t.num_iterations > 0:
        iters = t.num_iterations
    elif canonical_kind(config.data.kind) in EPOCH_KINDS:
        raise ValueError("train.num_iterations=-1 (one epoch of the conversation mixture) is counted when training "
                         "starts (nanojax.data.chat.fill_epoch_iterations); set it > 0 to derive sizes without that")
    elif t.target_param_data_ratio > 0:
        iters = int(t.target_param_data_ratio * total) // t.total_batch_size
    else:
        raise ValueError("set train.num_iterations > 0 or train.target_param_data_ratio > 0")
    return Derived(
        num_params=total,
        num_embedding_params=embedding,
        flops_per_token=m.flops_per_token(),
        num_devices=num_devices,
        data_parallel=dp,
        grad_accum_steps=accum,
        global_micro_batch=micro_rows,
        num_iterations=iters,
        total_tokens=iters * t.total_batch_size,
    )
