import json

from helpers import micro_config
from nanojax import inspect as nj_inspect
from nanojax.train import run


def test_inspect_reads_metadata_only(tmp_path, capsys):
    c = micro_config(tmp_path / "run", mesh=(1, 2, 2), steps=2)
    run(c)
    capsys.readouterr()
    assert nj_inspect.main([str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "step        2" in text and "blocks.mlp.c_fc.kernel" in text
    assert "(2, 64, 256)" in text and "'fsdp', 'tensor'" in text
    assert nj_inspect.main([str(tmp_path / "run"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_params"] == 131_072
    assert info["param_bytes"] == 4 * 131_072
    assert info["opt_state_bytes"] > info["param_bytes"]
    assert info["config"]["model"]["depth"] == 2
    assert info["data_state_files"] == ["process_0-of-1.json"]


def test_inspect_bad_path_is_a_clear_error(tmp_path, capsys):
    assert nj_inspect.main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert nj_inspect.main([str(tmp_path / "empty")]) == 2
    assert "no checkpoints under" in capsys.readouterr().err
