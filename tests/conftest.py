"""Shared test set-up: an 8-device CPU mesh, forced before JAX is imported anywhere."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Commands the tests start without a configured cache (generate, evaluate, train on a local
# workdir) use the user's compilation cache (moss_jax/diagnostics.py); keep tests out of ~/.cache.
os.environ.setdefault("MOSS_JAX_CACHE_DIR", os.path.join(
    os.environ.get("TMPDIR", "/tmp"), f"moss_jax_test_cache_{os.getuid()}"))

import pathlib  # noqa: E402

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
REAL_AUDIO = SHARED / "real_audio"
# CI sets this: there a missing ../shared is a broken checkout, not a reason to skip.
REQUIRE_SHARED = os.environ.get("MOSS_JAX_REQUIRE_SHARED", "") not in ("", "0")


@pytest.fixture(scope="session")
def real_audio_dir() -> pathlib.Path:
  """../shared/real_audio: the real recordings. A plain clone has no ../shared, so the tests that
  need them skip, saying so (`pytest -ra` lists the reason); everything else still runs."""
  if not REAL_AUDIO.is_dir():
    message = (f"real recordings not found at {REAL_AUDIO}: put the project's shared/ folder "
               "beside the repository to run this test")
    if REQUIRE_SHARED:
      pytest.fail(message + " (MOSS_JAX_REQUIRE_SHARED is set)")
    pytest.skip(message)
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
