"""`nanojax.evaluate` on a mesh: the model sharded over 8 devices (data 2 × fsdp 4), batch rows split over them,
gives the numbers of one device for bpb, CORE, a categorical and a generative task. (Several hosts:
tests/multiprocess/test_two_processes.py.)"""
import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh

from helpers import micro_config
from nanojax import evaluate as ev
from nanojax import sharding as shd
from nanojax.model import GPT
from nanojax.tasks import core
from nanojax.tokenizer import Tokenizer
from test_evaluate import EchoTask, LetterTask, make_bundle

VOCAB, SEQ = 265, 128


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_ranks({bytes([i]): i for i in range(256)})


@pytest.fixture(scope="module")
def config():
    c = micro_config()
    c.model.vocab_size, c.model.seq_len = VOCAB, SEQ
    c.data.kind = "synthetic"  # bpb's validation rows: a pure function of the seed
    c.train.eval_tokens = 4 * 8 * SEQ
    return c


@pytest.fixture(scope="module")
def models(config):
    """(on one device, on a data 2 × fsdp 4 mesh): the same random weights."""
    model = GPT(config.model, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    keys = iter(jax.random.split(jax.random.key(1), 64))
    nnx.update(model, jax.tree.map(lambda x: 0.3 * jax.random.normal(next(keys), x.shape, x.dtype), state))
    mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(2, 4, 1), shd.MESH_AXES)
    graphdef, params = nnx.split(model, nnx.Param)
    sharded = jax.tree.map(jax.device_put, params, shd.param_shardings(params, mesh))
    on_mesh = nnx.merge(graphdef, sharded)
    assert ev.mesh_of(model) is None and ev.mesh_of(on_mesh).size == 8
    assert not jax.tree.leaves(sharded)[0].sharding.is_fully_replicated  # really split over the devices
    return model, on_mesh


def test_bpb_on_8_devices_equals_one(models, tok, config):
    one, eight = (ev.evaluate_bpb(m, tok, config, batch_rows=8) for m in models)
    assert one["tokens"] == eight["tokens"] == 4 * 8 * SEQ and one["bytes"] == eight["bytes"] > 0
    assert eight["bpb"] == pytest.approx(one["bpb"], rel=1e-5)


def test_core_on_8_devices_equals_one(models, tok, tmp_path):
    bundle = make_bundle(tmp_path / "bundle")
    one, eight = (core.evaluate_core(ev.core_forward(m), tok, bundle, max_len=SEQ, batch_rows=6, log=lambda *a: None)
                  for m in models)  # 6 rows: padded to 8 on the mesh
    assert eight["results"] == one["results"] and eight["core_metric"] == pytest.approx(one["core_metric"])
    ids = np.random.default_rng(0).integers(0, 256, (5, 64)).astype(np.int32)
    (l1, p1), (l8, p8) = (ev.core_forward(m)(ids) for m in models)
    np.testing.assert_allclose(l8, l1, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(p8, p1)


def test_categorical_on_8_devices_equals_one(models, tok):
    task = LetterTask(list("ABCDABCDABC"))
    one, eight = (ev.evaluate_categorical(m, tok, task, batch_size=4) for m in models)
    assert eight == one and one["total"] == 11
    graphdef, state = nnx.split(models[1])
    ids = np.asarray([tok.render_for_completion(task[i])[:40] for i in range(8)], np.int32)
    pos = np.full(8, 39, np.int32)
    mesh = ev.mesh_of(models[1])
    logits8 = ev._logits_at(graphdef, state, ev.on_devices(ids, mesh), ev.on_devices(pos, mesh), mesh=mesh)
    assert logits8.sharding.is_fully_replicated  # every host reads the whole result
    graphdef, state = nnx.split(models[0])
    np.testing.assert_allclose(np.asarray(logits8), np.asarray(ev._logits_at(graphdef, state, ids, pos)),
                               rtol=1e-5, atol=1e-5)


def test_generative_on_8_devices_equals_one(models, tok):
    tasks = EchoTask(5), EchoTask(5)
    one, eight = (ev.evaluate_generative(m, tok, t, batch_size=2, max_new_tokens=6) for m, t in zip(models, tasks))
    assert eight == one and one["passed"] == 3
    assert tasks[1].completions == tasks[0].completions and len(tasks[0].completions) == 5
