"""`train.profile=START:STOP` writes a trace of exactly those steps; bad ranges are refused by name."""
import pytest
from helpers import micro_config

from nanojax import config as cfglib
from nanojax.profiling import parse_range
from nanojax.train import run


def test_a_run_writes_a_trace_of_the_asked_steps(tmp_path):
    config = micro_config(tmp_path / "run", steps=4)
    config.train.profile = "2:3"
    out = run(config)
    assert out["step"] == 4
    traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0
    assert list((tmp_path / "run" / "profile").rglob("*.trace.json.gz"))


@pytest.mark.parametrize("spec", ["3:1", "0:2", "5", "a:b"])
def test_bad_ranges_are_refused(spec):
    with pytest.raises(ValueError, match="profile="):
        parse_range(spec)
    config = micro_config()
    config.train.profile = spec
    with pytest.raises(ValueError, match="config.train.profile"):
        cfglib.validate(config)
    assert parse_range("") is None and parse_range("2:2") == (2, 2)
