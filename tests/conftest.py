"""Shared test set-up: an 8-device CPU mesh, forced before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REAL_AUDIO = SHARED / "real_audio"


@pytest.fixture(scope="session")
def real_audio_dir() -> pathlib.Path:
  if not REAL_AUDIO.is_dir():
    pytest.fail(f"real recordings not found at {REAL_AUDIO}: clone the project with ../shared beside it")
  return REAL_AUDIO


@pytest.fixture(scope="module")
def fast_compiles():
  """XLA's CPU optimisation passes dominate compile time of tiny models; float32 numerics stay
  exact enough for the 1e-5 comparisons. Use with `pytestmark = pytest.mark.usefixtures(...)`."""
  import jax  # imported here so the device-count flag above is set first
  old = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", old)
