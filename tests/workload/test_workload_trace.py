from pathlib import Path

import numpy as np
import pytest

from lemix.workload import Trace, TraceError, read_trace

DATA = Path(__file__).parent / "data"
EXCERPT = DATA / "azure_code_excerpt.csv"
REAL = Path(__file__).resolve().parents[2].parent / "shared" / "traces" / "azure_llm_code_2023.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def write(tmp_path: Path, text: str, name: str = "t.csv") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# ------------------------------------------------------------------ real data

@pytest.mark.skipif(not REAL.exists(), reason="../shared/traces is not present")
def test_real_trace():
    tr = read_trace(REAL)
    # The file holds 8,819 data rows (its README says 8,818: the last row has no newline).
    assert len(tr) == 8819
    assert tr.arrival_s[0] == 0.0 and np.all(np.diff(tr.arrival_s) >= 0)
    assert 3400 < tr.span_s < 3600               # about one hour
    assert 2.4 < tr.rate_per_s < 2.7             # ~2.57 requests/s
    assert abs(tr.prompt_tokens.mean() - 2048) < 5 and tr.prompt_tokens.max() == 7437
    assert abs(tr.output_tokens.mean() - 28) < 1 and tr.output_tokens.max() == 1899
    assert tr.prompt_tokens.dtype == np.int64


@pytest.mark.skipif(not REAL.exists(), reason="../shared/traces is not present")
def test_real_trace_window():
    full = read_trace(REAL)
    tr = read_trace(REAL, start_s=600.0, duration_s=300.0)
    inside = (full.arrival_s >= 600) & (full.arrival_s < 900)
    assert len(tr) == inside.sum()
    np.testing.assert_allclose(tr.arrival_s, full.arrival_s[inside] - 600.0)
    assert tr.span_s == 300.0


def test_excerpt_fixture_skips_comments():
    tr = read_trace(EXCERPT)
    assert len(tr) == 40
    assert tr.arrival_s[0] == 0.0
    # 18:17:04.0319600 - 18:17:03.9799600, with all 7 fractional digits kept
    assert tr.arrival_s[1] == pytest.approx(0.052, abs=1e-9)
    assert (tr.prompt_tokens[0], tr.output_tokens[0]) == (4808, 10)
    assert "Splitwise" in EXCERPT.read_text()        # attribution travels with the fixture
    assert (DATA / "README.md").exists()


def test_speedup_scales_times():
    slow, fast = read_trace(EXCERPT), read_trace(EXCERPT, speedup=4.0)
    np.testing.assert_allclose(fast.arrival_s, slow.arrival_s / 4.0)
    assert fast.span_s == pytest.approx(slow.span_s / 4.0)
    assert fast.rate_per_s == pytest.approx(4.0 * slow.rate_per_s)
    np.testing.assert_array_equal(fast.prompt_tokens, slow.prompt_tokens)


def test_max_rows_and_window():
    tr = read_trace(EXCERPT, max_rows=5)
    assert len(tr) == 5 and tr.span_s == tr.arrival_s[-1]
    full = read_trace(EXCERPT)
    w = read_trace(EXCERPT, start_s=1.0, duration_s=30.0)
    inside = (full.arrival_s >= 1.0) & (full.arrival_s < 31.0)
    np.testing.assert_allclose(w.arrival_s, full.arrival_s[inside] - 1.0)
    with pytest.raises(TraceError, match="no rows in the window"):
        read_trace(EXCERPT, start_s=10_000.0)


# ------------------------------------------------------------------ formats

def test_float_seconds_columns_any_order_crlf_and_extra_columns(tmp_path):
    text = "GeneratedTokens,id,timestamp,ContextTokens\r\n5,a,100.5,10\r\n6,b,101.0,11\r\n\r\n7,c,103.5,12\r\n"
    tr = read_trace(write(tmp_path, text))
    np.testing.assert_allclose(tr.arrival_s, [0.0, 0.5, 3.0])
    np.testing.assert_array_equal(tr.prompt_tokens, [10, 11, 12])
    np.testing.assert_array_equal(tr.output_tokens, [5, 6, 7])


def test_iso_t_separator_and_no_fraction(tmp_path):
    text = HEADER + "2023-11-16T23:59:59,1,1\n2023-11-17 00:00:01.25Z,2,2\n"
    assert read_trace(write(tmp_path, text)).arrival_s.tolist() == [0.0, 2.25]


def test_slightly_unordered_rows_are_sorted(tmp_path):
    text = HEADER + "10.0000,1,1\n10.0005,2,2\n10.0002,3,3\n11.0,4,4\n"
    tr = read_trace(write(tmp_path, text), unordered_tolerance_s=1e-3)
    np.testing.assert_array_equal(tr.prompt_tokens, [1, 3, 2, 4])
    assert np.all(np.diff(tr.arrival_s) >= 0)


def test_first_row_slightly_late_rebases_on_earliest(tmp_path):
    text = HEADER + "10.0005,1,1\n10.0,2,2\n"
    tr = read_trace(write(tmp_path, text))
    assert tr.arrival_s.tolist() == pytest.approx([0.0, 0.0005])
    assert tr.prompt_tokens.tolist() == [2, 1]


# ------------------------------------------------------------------ errors name the line

@pytest.mark.parametrize(
    "text, line, match",
    [
        (HEADER + "1.0,5,5\n2.0,x,5\n", 3, "ContextTokens is not an integer"),
        (HEADER + "1.0,5,5\n2.0,5,2.5\n", 3, "GeneratedTokens is not an integer"),
        (HEADER + "1.0,5,5\n2.0,-5,5\n", 3, "ContextTokens is negative"),
        (HEADER + "1.0,5,5\n2.0,5,-1\n", 3, "GeneratedTokens is negative"),
        (HEADER + "1.0,5,5\n2.0,5\n", 3, "expected 3 fields, got 2"),
        (HEADER + "1.0,5,5\nsoon,5,5\n", 3, "unparseable TIMESTAMP"),
        (HEADER + "1.0,5,5\nnan,5,5\n", 3, "unparseable TIMESTAMP"),
        (HEADER + "2023-11-16 18:17:03.97,1,1\n2023-13-16 18:17:04.00,1,1\n", 3, "unparseable TIMESTAMP"),
        (HEADER + "2023-11-16 18:17:03.97,1,1\n5.0,1,1\n", 3, "unparseable TIMESTAMP"),
        (HEADER + "5.0,1,1\n4.0,1,1\n", 3, "goes back 1 s"),
        (HEADER + "5.0,1,1\n6.0,1,1\n5.5,1,1\n", 4, "goes back"),
        ("# note\n\nTIMESTAMP,ContextTokens\n1.0,2\n", 3, "header lacks column 'generatedtokens'"),
        ("1.0,5,5\n", 1, "header lacks column 'timestamp'"),
    ],
)
def test_errors_name_file_and_line(tmp_path, text, line, match):
    path = write(tmp_path, text)
    with pytest.raises(TraceError, match=match) as info:
        read_trace(path)
    assert info.value.line == line
    assert str(info.value).startswith(f"{path}:{line}: ")


@pytest.mark.parametrize("text", ["", "# only a comment\n\n", HEADER, HEADER + "# trailing comment\n"])
def test_empty_trace(tmp_path, text):
    path = write(tmp_path, text)
    with pytest.raises(TraceError, match="empty trace") as info:
        read_trace(path)
    assert str(path) in str(info.value) and info.value.line is None


def test_missing_file_and_bad_utf8(tmp_path):
    with pytest.raises(TraceError, match="cannot read trace"):
        read_trace(tmp_path / "absent.csv")
    p = tmp_path / "bin.csv"
    p.write_bytes(HEADER.encode() + b"1.0,1,1\n\xff\xfe,1,1\n")
    with pytest.raises(TraceError, match="UTF-8") as info:
        read_trace(p)
    assert info.value.line == 3


@pytest.mark.parametrize(
    "kwargs",
    [dict(speedup=0), dict(speedup=-1.0), dict(max_rows=0), dict(max_rows=2.5),
     dict(start_s=-1.0), dict(duration_s=0.0), dict(unordered_tolerance_s=-1.0)],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        read_trace(EXCERPT, **kwargs)


def test_trace_constructor_validates():
    tr = Trace(np.array([0.0, 1.0]), np.array([3, 4]), np.array([1, 2]))
    assert tr.span_s == 1.0 and len(tr) == 2
    with pytest.raises(ValueError, match="sorted"):
        Trace(np.array([1.0, 0.5]), np.array([3, 4]), np.array([1, 2]))
    with pytest.raises(ValueError, match="equal length"):
        Trace(np.array([0.0]), np.array([3, 4]), np.array([1, 2]))
    with pytest.raises(ValueError, match="undefined"):
        _ = Trace(np.array([0.0]), np.array([3]), np.array([1])).rate_per_s
    with pytest.raises(ValueError):
        tr.arrival_s[0] = 5.0                     # arrays are read-only
