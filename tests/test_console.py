"""Library log lines are errors-only by default; NANOJAX_VERBOSE=1 brings them back."""
import os
import subprocess
import sys

import pytest

SCRIPT = ("from absl import logging; from nanojax.console import quiet_library_logs; quiet_library_logs(); "
          "logging.warning('orbax-style note'); logging.error('a real error')")


@pytest.mark.parametrize("verbose,shown", [("", False), ("1", True)])
def test_library_warnings_hidden_unless_verbose(verbose, shown):
    env = {**os.environ, "NANOJAX_VERBOSE": verbose}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True)
    assert ("orbax-style note" in out.stderr) == shown
    assert "a real error" in out.stderr
