"""The one error type for bad input, with a short machine-readable reason for per-reason counts."""

from __future__ import annotations

from moss_jax.errors import UserError

# Reasons a record can be rejected. Pipelines count skipped records under these keys.
MISSING_FILE = "missing_file"
EMPTY_FILE = "empty_file"
CORRUPT_AUDIO = "corrupt_audio"
UNSUPPORTED_FORMAT = "unsupported_format"
NON_FINITE_AUDIO = "non_finite_audio"
TOO_SHORT = "too_short"
TOO_LONG = "too_long"
MALFORMED_JSON = "malformed_json"
MISSING_FIELD = "missing_field"
BAD_FIELD = "bad_field"
BAD_ENCODING = "bad_encoding"
BAD_TIMESTAMPS = "bad_timestamps"
DOES_NOT_FIT = "does_not_fit"
REASONS = (MISSING_FILE, EMPTY_FILE, CORRUPT_AUDIO, UNSUPPORTED_FORMAT, NON_FINITE_AUDIO, TOO_SHORT,
           TOO_LONG, MALFORMED_JSON, MISSING_FIELD, BAD_FIELD, BAD_ENCODING, BAD_TIMESTAMPS,
           DOES_NOT_FIT)


class BadRecordError(ValueError):
  """A manifest record (or the audio it names) that cannot be used.

  `reason` is one of the constants above; the message names the record (manifest:line or id)
  and the file, so a user can find and fix it.
  """

  def __init__(self, reason: str, detail: str, *, record: str | None = None,
               path: str | None = None):
    self.reason = reason
    self.detail = detail
    self.record = record
    self.path = path
    where = ", ".join(x for x in (f"record {record}" if record else "",
                                   f"file {path}" if path else "") if x)
    super().__init__(f"{reason}: {detail}" + (f" ({where})" if where else ""))


class ManifestError(UserError, ValueError):
  """A manifest that cannot be read at all (missing, empty, not named): the run cannot start."""


class ManifestNotFound(ManifestError, FileNotFoundError):
  pass


class TokenizerError(UserError, ValueError):
  """config.data.tokenizer names no usable tokenizer (wrong kind, wrong file)."""


class TokenizerNotFound(TokenizerError, FileNotFoundError):
  pass


class NoUsableRecords(UserError):
  """Every record of the training manifests was rejected: no batch can ever be made.

  Raised by the loader instead of cycling through the same bad records forever (a typo in
  data.max_tokens makes every record does_not_fit; a wrong path prefix makes every file missing).
  """

  def __init__(self, rejected: int, distinct: int, num_records: int, reasons: dict[str, int],
               example: str):
    self.reasons = dict(reasons)
    by_reason = ", ".join(f"{r} {n}" for r, n in sorted(reasons.items(), key=lambda x: -x[1]))
    hint = ""
    if DOES_NOT_FIT in reasons:
      hint = " (does_not_fit: raise data.max_tokens or data.max_audio_chunks)"
    super().__init__(
        f"no usable training record: the last {rejected} records read ({distinct} distinct of "
        f"{num_records}) were all rejected ({by_reason}){hint}; first: {example}")
