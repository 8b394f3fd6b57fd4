"""What every `python -m moss_jax.<command>` shares: absl flags, logging, one-line errors.

Every command defines its flags with absl (snake_case names, `--config` with overrides where a
config is taken) and ends with `cli.run(main)`. Then:
- the project's own INFO lines are shown, while Orbax's, absl's and JAX's per-save and
  per-compile chatter is quieted by logger (`--verbosity` still raises everything);
- a `UserError` (or anything derived from it, such as `ConfigError`) prints `error: <message>`
  on one line and exits with status 2; Ctrl-C exits with status 130 and one line;
- `LimitedWarnings` keeps a warning that repeats (one per bad record, say) from flooding a log.
"""

from __future__ import annotations

import logging as std_logging
import os
import re
import sys
from typing import Callable, NoReturn, Sequence

from absl import app, flags, logging

from moss_jax.errors import UserError

# Loggers that log every save, restore or compile at INFO; a training log is unreadable with them.
CHATTY_LOGGERS = ("orbax", "absl.orbax", "jax._src", "jax", "grain", "tensorstore", "etils",
                  "google.cloud", "urllib3")


def setup_logging() -> None:
  """INFO for the project's lines, WARNING for the libraries' (unless --verbosity was given)."""
  if "verbosity" in flags.FLAGS and flags.FLAGS["verbosity"].present:
    return
  logging.set_verbosity(logging.INFO)
  for name in CHATTY_LOGGERS:
    std_logging.getLogger(name).setLevel(std_logging.WARNING)
  # absl.logging routes Python logging through one handler; Orbax logs through absl.logging at
  # INFO from its own modules, which the per-module filter below silences.
  handler = logging.get_absl_handler()
  if not any(isinstance(f, _QuietLibraries) for f in handler.filters):
    handler.addFilter(_QuietLibraries())


class _QuietLibraries(std_logging.Filter):
  """Drops records below WARNING that come from library code logging through absl, and cuts the
  library's warnings and errors to their first line.

  A library error that matters reaches the command as an exception, which the project reports in
  its own words (a failed save names the step and the last good checkpoint); the library's own
  tracebacks (Orbax logs one per background thread, asyncio one per unretrieved task, each with
  kilobytes of TensorStore spec) would bury that line. `--verbosity` shows them all again.
  """

  LIBRARIES = ("orbax", "jax", "grain", "flax", "etils", "asyncio", "tensorstore")
  MAX_CHARS = 300

  def filter(self, record: std_logging.LogRecord) -> bool:
    path = record.pathname.replace("\\", "/")
    if not any(f"/{lib}/" in path for lib in self.LIBRARIES):
      return True
    if record.levelno < std_logging.WARNING:
      return False
    lines = record.getMessage().strip().splitlines() or [""]
    first = lines[0]
    if len(first) > self.MAX_CHARS or len(lines) > 1 or record.exc_info:
      first = first[:self.MAX_CHARS] + " [...]"
    record.msg, record.args = first, None
    record.exc_info = record.exc_text = record.stack_info = None
    return True


def _quiet_late_unraisable(hook=sys.unraisablehook):
  """An unraisablehook that drops "Event loop is closed" from TensorStore callbacks.

  When an Orbax save or restore fails, Orbax closes its asyncio loop while TensorStore still has
  reads or writes in flight; each one that completes later calls back into the closed loop and
  the RuntimeError is reported as unraisable (a bare traceback; hundreds during a restore
  fallback). The failure itself has been reported already; these carry nothing.
  """

  def unraisablehook(unraisable):
    if (unraisable.exc_type is RuntimeError and
        str(unraisable.exc_value) == "Event loop is closed"):
      return
    hook(unraisable)

  return unraisablehook


def exit_without_teardown(code: int) -> NoReturn:
  """Ends the process now, with `code`, after flushing stdio and the log handlers.

  For exits right after Ctrl-C or a stop signal (the `finally` blocks have run by then). A compile
  the interrupt cut short keeps running on XLA's own thread pool (the Python call returns, the
  C++ work does not stop), and the interpreter's normal teardown frees JAX's client under it: a
  Ctrl-C during the demo's start-up ended in SIGSEGV (`Fatal Python error: Segmentation fault`,
  PjRtLoadedExecutable::Create on a destroyed device) in 3 of 4 tries. os._exit skips that
  teardown (and atexit handlers: nothing of ours needs them once the run is closed).
  """
  for stream in (sys.stdout, sys.stderr):
    try:
      stream.flush()
    except (OSError, ValueError):  # a closed pipe or stream: nothing left to flush to
      pass
  std_logging.shutdown()
  os._exit(code)  # pylint: disable=protected-access


def run(main: Callable[[Sequence[str]], int | None]) -> None:
  """absl `app.run` with the project's logging and one-line errors."""

  def wrapped(argv: Sequence[str]) -> int | None:
    setup_logging()
    sys.unraisablehook = _quiet_late_unraisable()
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
      return main(argv)
    except UserError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      return 2
    except KeyboardInterrupt:
      print("interrupted", file=sys.stderr, flush=True)
      exit_without_teardown(130)  # whatever XLA was compiling may still be running

  app.run(lambda argv: sys.exit(wrapped(argv) or 0), flags_parser=parse_flags)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl's flag parsing, with every mistake (an unknown flag, an unknown config field, a config
  file that does not load) reported as one `error:` line and status 2 instead of a traceback."""
  try:
    args = flags.FLAGS(argv)
    for name in list(flags.FLAGS):
      flag = flags.FLAGS[name]
      # ml_collections config flags load their file lazily: load it now, where errors are ours.
      # (A file that failed to load is kept as an object raising on first use: use it now.)
      if type(flag).__module__.startswith("ml_collections") and flag.present:
        hasattr(flag.value, "to_dict")
    return args
  except flags.Error as e:
    _fail(f"{e} (see --help)")
  except (AttributeError, KeyError) as e:  # an override naming a field the config lacks
    _fail(_unknown_field_message(e, argv))
  except (OSError, ImportError, SyntaxError, ValueError, TypeError) as e:  # the config file
    _fail(f"cannot load the config: {_last_line(e)}")
  raise AssertionError("unreachable")


def _fail(message: str) -> None:
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(2)


def _last_line(e: BaseException) -> str:
  lines = [l.strip() for l in str(e).splitlines() if l.strip()]
  return lines[-1] if lines else type(e).__name__


def _unknown_field_message(e: BaseException, argv: Sequence[str]) -> str:
  chain, cur = [], e
  while cur is not None and cur not in chain:
    chain.append(cur)
    cur = cur.__cause__ or cur.__context__
  name = re.search(r"[A-Za-z_][A-Za-z0-9_]*", str(e))
  key = name.group(0) if name else str(e)
  suggestion = re.search(r'Did you mean "([^"]+)"', " ".join(str(c) for c in chain))
  detail = f" (did you mean {suggestion.group(1)!r}?)" if suggestion else ""
  given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=")[0]]
  named = [a for a in given if a.rsplit(".", 1)[-1] == key]
  where = f" in {named[0]}" if named else ""
  return f"unknown config field {key!r}{where}{detail}"


def require(*names: str) -> None:
  """Raises UserError naming every required flag that was not given."""
  missing = [f"--{n}" for n in names if flags.FLAGS[n].value in (None, "", [])]
  if missing:
    raise UserError(f"missing required flag(s): {', '.join(missing)} (see --help)")


class LimitedWarnings:
  """Logs the first `first` warnings of each kind, then only every `every`-th, with a running count.

  `warn(key, msg, *args)`: `key` groups messages of one kind (a bad-record reason, say).
  """

  def __init__(self, first: int = 10, every: int = 1000):
    self.first = first
    self.every = every
    self.counts: dict[str, int] = {}

  def warn(self, key: str, msg: str, *args) -> None:
    n = self.counts.get(key, 0) + 1
    self.counts[key] = n
    if n <= self.first:
      logging.warning(msg, *args)
      if n == self.first:
        logging.warning("(further '%s' warnings are shown once every %d)", key, self.every)
    elif n % self.every == 0:
      logging.warning(msg + " [%d so far]", *args, n)
