"""The one error type for bad input, with a short machine-readable reason for per-reason counts."""

from __future__ import annotations

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
