"""Request traces in the Azure LLM inference trace CSV format.

    TIMESTAMP,ContextTokens,GeneratedTokens
    2023-11-16 18:17:03.9799600,4808,10

Format rules (decided here, pinned by tests):

- Lines whose first non-blank character is `#` are comments, and blank lines are skipped, both
  before and after the header, so a fixture can carry its attribution in the file itself.
- The header names the three columns, in any order, case-insensitively; extra columns are
  ignored. Every data row must have as many fields as the header.
- TIMESTAMP is either a date-time `YYYY-MM-DD HH:MM:SS[.fffffff]` (any number of fractional
  digits, `T` allowed as the separator, a trailing `Z` allowed; read as UTC) or a plain float of
  seconds. The first data row fixes which; mixing the two is an error.
- Token counts are non-negative base-10 integers.
- Rows may be slightly out of order (logs merged from several machines): a timestamp that lies at
  most `unordered_tolerance_s` before the latest one seen so far is accepted and the rows are
  stably sorted by time; going back further is an error.
- Times are made relative to the earliest timestamp (the first row, unless the next rows are
  slightly earlier within the tolerance), then divided by `speedup`.

Every problem raises `TraceError` naming the file and, where it is about one line, that line
(1-based, counting every physical line of the file).
"""
from __future__ import annotations

import csv
import datetime as dt
import math
import operator
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lemix.workload.arrivals import check_finite
from lemix.workload.errors import InputFileError, file_lines

TIME_COLUMN = "timestamp"
PROMPT_COLUMN = "contexttokens"
OUTPUT_COLUMN = "generatedtokens"
_COLUMNS = (TIME_COLUMN, PROMPT_COLUMN, OUTPUT_COLUMN)

_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?Z?$"
)
_INT_RE = re.compile(r"^[+-]?\d+$")
_EPOCH = dt.datetime(1970, 1, 1)


class TraceError(InputFileError):
    """A trace file that cannot be read; names the file and (when known) the 1-based line."""


@dataclass(frozen=True, eq=False)
class Trace:
    """Inference requests of a trace: arrival times (s, from 0) and token counts.

    `span_s` is the stretch of time the trace covers (already divided by speedup): the window
    length when `read_trace` was given `duration_s` (clipped to the data), else the last arrival.
    """

    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray
    span_s: float = -1.0          # < 0: derive from the last arrival
    path: str = ""
    speedup: float = 1.0

    def __post_init__(self) -> None:
        # Private read-only copies: a Trace never changes, nor freezes the caller's arrays.
        arr = np.array(self.arrival_s, dtype=np.float64)
        p = np.array(self.prompt_tokens, dtype=np.int64)
        o = np.array(self.output_tokens, dtype=np.int64)
        if not (arr.ndim == p.ndim == o.ndim == 1 and len(arr) == len(p) == len(o)):
            raise ValueError("arrival_s, prompt_tokens and output_tokens must be 1-D of equal length")
        if len(arr) and (not np.all(np.isfinite(arr)) or arr[0] < 0 or np.any(np.diff(arr) < 0)):
            raise ValueError("arrival_s must be finite, >= 0 and sorted")
        if np.any(p < 0) or np.any(o < 0):
            raise ValueError("token counts must be >= 0")
        span = float(self.span_s)
        if span < 0:
            span = float(arr[-1]) if len(arr) else 0.0
        for name, value in (("arrival_s", arr), ("prompt_tokens", p), ("output_tokens", o)):
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "span_s", span)

    def __len__(self) -> int:
        return len(self.arrival_s)

    @property
    def rate_per_s(self) -> float:
        """Mean request rate over the span (requests / span_s)."""
        if self.span_s <= 0:
            raise ValueError("trace spans no time; its rate is undefined")
        return len(self) / self.span_s


def _positive(name: str, value: float) -> float:
    x = check_finite(name, value)
    if x <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return x


def _non_negative(name: str, value: float) -> float:
    x = check_finite(name, value)
    if x < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return x


def _parse_datetime(text: str) -> tuple[int, float] | None:
    """`YYYY-MM-DD HH:MM:SS.fffffff` -> (whole epoch seconds, fraction); None if malformed.

    Kept as two parts because a float64 epoch has only ~0.2 us resolution in 2023.
    """
    m = _DATETIME_RE.match(text)
    if m is None:
        return None
    y, mo, d, h, mi, s = (int(g) for g in m.groups()[:6])
    try:
        whole = dt.datetime(y, mo, d, h, mi, s)
    except ValueError:
        return None
    frac = m.group(7) or "0"
    seconds = int((whole - _EPOCH).total_seconds())
    return seconds, int(frac) / 10 ** len(frac)


def _parse_count(text: str, column: str, path: str | Path, line: int) -> int:
    if not _INT_RE.match(text):
        raise TraceError(path, line, f"{column} is not an integer: {text!r}")
    value = int(text)
    if value < 0:
        raise TraceError(path, line, f"{column} is negative: {value}")
    return value


def _data_lines(path: str | Path):
    """Yield (1-based line number, text) for non-blank, non-comment lines."""
    for number, text in file_lines(path, TraceError, "trace"):
        stripped = text.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def _header_index(path: str | Path, line: int, fields: list[str]) -> dict[str, int]:
    names = [f.strip().lower() for f in fields]
    index = {}
    for col in _COLUMNS:
        if col not in names:
            want = "TIMESTAMP,ContextTokens,GeneratedTokens"
            raise TraceError(path, line, f"header lacks column {col!r} (expected {want}), got {fields}")
        index[col] = names.index(col)
    return index


def read_trace(
    path: str | Path,
    *,
    speedup: float = 1.0,
    max_rows: int | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    unordered_tolerance_s: float = 1e-3,
) -> Trace:
    """Read an Azure-format trace.

    The window [start_s, start_s + duration_s) is in the trace's own seconds from its earliest
    timestamp (before speedup); arrivals are re-based to the window start. `max_rows` then keeps
    the first rows of the window. Reading stops past the window's end, so rows after it are not
    checked.
    """
    speedup = _positive("speedup", speedup)
    start_s = _non_negative("start_s", start_s)
    if duration_s is not None:
        duration_s = _positive("duration_s", duration_s)
    unordered_tolerance_s = _non_negative("unordered_tolerance_s", unordered_tolerance_s)
    if max_rows is not None:
        try:
            max_rows = operator.index(max_rows)
        except TypeError:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}") from None
        if max_rows < 1:
            raise ValueError(f"max_rows must be a positive integer, got {max_rows!r}")

    lines = _data_lines(path)
    header = next(lines, None)
    if header is None:
        raise TraceError(path, None, "empty trace: no header line")
    header_line, header_text = header
    header_fields = next(csv.reader([header_text]))
    col = _header_index(path, header_line, header_fields)

    whole: list[int] = []       # epoch seconds (date-time form) or 0 (float form)
    frac: list[float] = []      # fractional seconds (date-time form) or the float seconds
    prompts: list[int] = []
    outputs: list[int] = []
    is_datetime: bool | None = None
    first_w, first_f = 0, 0.0
    latest_t = 0.0              # latest time seen, relative to the first row
    window_end = math.inf if duration_s is None else start_s + duration_s
    stopped_early = False

    for number, text in lines:
        fields = next(csv.reader([text]))
        if len(fields) != len(header_fields):
            raise TraceError(path, number, f"expected {len(header_fields)} fields, got {len(fields)}")
        stamp = fields[col[TIME_COLUMN]].strip()
        parsed = _parse_datetime(stamp)
        if is_datetime is None:
            is_datetime = parsed is not None
        if is_datetime:
            if parsed is None:
                raise TraceError(path, number, f"unparseable TIMESTAMP {stamp!r} "
                                               "(expected YYYY-MM-DD HH:MM:SS[.fraction])")
            w, f = parsed
        else:
            try:
                w, f = 0, float(stamp)
            except ValueError:
                w, f = 0, math.nan
            if not math.isfinite(f):
                raise TraceError(path, number, f"unparseable TIMESTAMP {stamp!r} "
                                               "(expected float seconds, like the first row)")
        if not whole:
            first_w, first_f = w, f
        # Whole seconds subtract as integers, so 7 fractional digits survive float64.
        t = (w - first_w) + (f - first_f)
        if whole and t < latest_t - unordered_tolerance_s:
            raise TraceError(path, number, f"timestamp goes back {latest_t - t:.6g} s, more than "
                                           f"the tolerance of {unordered_tolerance_s:g} s")
        latest_t = max(latest_t, t)
        # Later rows lie at or after latest_t - tolerance, and the earliest row at or before the
        # first: once that bound passes the window's end, nothing further can fall inside it.
        if latest_t - unordered_tolerance_s >= window_end:
            stopped_early = True
            break
        whole.append(w)
        frac.append(f)
        prompts.append(_parse_count(fields[col[PROMPT_COLUMN]].strip(), "ContextTokens", path, number))
        outputs.append(_parse_count(fields[col[OUTPUT_COLUMN]].strip(), "GeneratedTokens", path, number))

    if not whole:
        raise TraceError(path, None, "empty trace: header but no data rows")
    rel = (np.asarray(whole, dtype=np.int64) - first_w).astype(np.float64)
    rel += np.asarray(frac, dtype=np.float64) - first_f
    order = np.argsort(rel, kind="stable")
    rel = rel[order] - rel[order[0]]          # relative to the earliest timestamp
    p = np.asarray(prompts, dtype=np.int64)[order]
    o = np.asarray(outputs, dtype=np.int64)[order]
    data_end = float(rel[-1])

    keep = (rel >= start_s) & (rel < window_end)
    rel, p, o = rel[keep] - start_s, p[keep], o[keep]
    truncated = max_rows is not None and len(rel) > max_rows
    if truncated:
        rel, p, o = rel[:max_rows], p[:max_rows], o[:max_rows]
    if len(rel) == 0:
        raise TraceError(path, None, f"no rows in the window [{start_s:g}, {window_end:g}) s "
                                     f"(the trace spans {data_end:g} s)")
    if truncated or duration_s is None:
        span = float(rel[-1])
    elif stopped_early:
        span = duration_s
    else:
        span = min(duration_s, data_end - start_s)
    return Trace(
        arrival_s=rel / speedup,
        prompt_tokens=p,
        output_tokens=o,
        span_s=span / speedup,
        path=str(path),
        speedup=speedup,
    )
