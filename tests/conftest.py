"""Test set-up: 8 fake CPU devices (every sharding path runs), no network, a private NANOJAX_HOME."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["WANDB_MODE"] = "offline"  # train.loggers=wandb in tests: files only, never the network

import pathlib  # noqa: E402

import pytest  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared"


@pytest.fixture(autouse=True)
def _nanojax_home(tmp_path, monkeypatch):
    """Every test gets its own NANOJAX_HOME so nothing leaks into ~/.cache or between tests."""
    home = tmp_path / "nanojax_home"
    monkeypatch.setenv("NANOJAX_HOME", str(home))
    return home


@pytest.fixture
def shared_dir():
    """../shared next to the checkout (real data); tests that need it skip cleanly when absent."""
    if not SHARED.is_dir():
        pytest.skip(f"shared data directory not found at {SHARED}")
    return SHARED
