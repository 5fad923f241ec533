import dataclasses
import re

import pytest
from absl import flags
from ml_collections import config_flags

from helpers import ROOT, load_config_file, micro_config
from nanojax import config as C


@pytest.mark.parametrize("name,params", [("base_d20", 560_988_160), ("base_d26", 1_081_999_360),
                                          ("base_d32", 1_879_048_192)])
def test_parameter_counts(name, params):
    c = load_config_file(name)
    assert C.count_params(C.fill_model_sizes(c.model))[0] == params


def test_d20_derived_numbers():
    c = load_config_file("base_d20")
    d = C.derive(c, num_devices=8)
    assert (c.model.width, c.model.n_head, c.model.n_kv_head, c.model.head_dim) == (1280, 10, 10, 128)
    assert d.num_iterations == 21_400
    assert d.total_tokens == 21_400 * 524_288
    assert d.grad_accum_steps == 1  # 32 × 2048 × 8 = 524,288
    assert C.derive(c, num_devices=1).grad_accum_steps == 8
    assert abs(d.flops_per_token - 3.4918e9) / 3.4918e9 < 1e-3
    assert "21,400" in d.summary()


def test_explicit_iterations_win():
    c = micro_config(steps=7)
    assert C.derive(c, 1).num_iterations == 7


def test_indivisible_batch_shows_the_numbers():
    c = micro_config()
    c.train.total_batch_size = 1000
    with pytest.raises(ValueError, match=r"1,000.*device_batch_size 4 × seq_len 32 × data-parallel 1"):
        C.derive(c, 1)


def test_mesh_shapes():
    c = micro_config()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, -1, 2
    assert C.mesh_shape(c.mesh, 8) == (2, 2, 2)
    c.mesh.fsdp = 3
    with pytest.raises(ValueError, match="2×3×2 = 12 but there are 8 devices"):
        C.mesh_shape(c.mesh, 8)
    c.mesh.data = -1
    c.mesh.fsdp = -1
    with pytest.raises(ValueError, match="at most one axis"):
        C.mesh_shape(c.mesh, 8)


def test_unknown_key_in_config_file_fails_with_its_name():
    c = C.default_config()
    with pytest.raises(AttributeError, match="dept"):
        c.model.dept = 3


def _parse(args):
    argv = ["prog", f"--config={ROOT / 'configs' / 'tiny.py'}", *args]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_command_line_overrides():
    c = _parse(["--config.model.depth=6", "--config.train.num_iterations=9"])
    assert c.model.depth == 6 and c.train.num_iterations == 9


def test_unknown_override_fails_with_its_name():
    with pytest.raises(Exception, match="dept"):
        _parse(["--config.model.dept=6"])


def test_bad_gqa_grouping():
    c = micro_config()
    c.model.n_head, c.model.n_kv_head = 3, 2
    with pytest.raises(ValueError, match="multiple of model.n_kv_head"):
        C.fill_model_sizes(c.model)


def test_model_config_is_typed_frozen_and_derived_in_one_place():
    mc = C.ModelConfig.of(load_config_file("base_d20").model)
    assert (mc.width, mc.n_head, mc.n_kv_head) == (1280, 10, 10)
    assert mc.param_counts()[0] == 560_988_160 and hash(mc) == hash(C.ModelConfig.of(mc))
    with pytest.raises(dataclasses.FrozenInstanceError):
        mc.depth = 3


def test_model_config_of_an_older_saved_config_takes_todays_defaults():
    saved = C.default_config().model.to_dict()
    del saved["loss_chunk_size"]  # as if written before the key existed
    assert C.ModelConfig.of(saved).loss_chunk_size == C.default_config().model.loss_chunk_size
    with pytest.raises(ValueError, match="unknown key.*'n_layers'"):
        C.ModelConfig.of({**saved, "n_layers": 3})


def test_shape_legend_gives_each_letter_one_meaning():
    legend = C.ModelConfig.__doc__.split("one meaning each:")[1]
    letters = re.findall(r"(?:^|\s{2,})([A-Z])  ", legend, flags=re.M)
    assert len(letters) == len(set(letters)) >= 14, letters


@pytest.mark.parametrize("name", ["gpt2_d24", "tiny_gpt2"])
def test_nanochat_head_configs_resolve(name):
    """The HEAD family's configs pick HEAD's model, optimizer and packing, validate, and derive their sizes
    (gpt2_d24: HEAD's automatic batch size, from the -1 it leaves in the config)."""
    c = load_config_file(name)
    C.validate(c)
    assert (c.model.family, c.optim.kind, c.data.packing) == ("head", "head", "bestfit")
    assert c.train.grad_clip == 0.0
    d = C.derive(c, 8)
    assert c.train.total_batch_size > 0 and d.num_iterations > 0
    if name == "gpt2_d24":
        assert c.data.dataset == "climbmix" and c.model.vocab_size == 32768
        assert C.ModelConfig.of(c.model).layer_windows()[-1] is None  # the last layer sees everything
