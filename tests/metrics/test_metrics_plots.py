"""Plots write non-empty PNGs, or return None when there is nothing to draw."""
from __future__ import annotations

from metrics_factory import make_result, mixed_result, op, req

from lemix.metrics.plots import (plot_gantt, plot_inference_loss, plot_latency_cdf,
                                 plot_policy_bars)
from lemix.metrics.summary import summarize
from lemix.types import OpKind

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


def test_policy_bars(tmp_path):
    sums = {"a": summarize(mixed_result("a")), "b": summarize(make_result("b"))}
    assert _is_png(plot_policy_bars(sums, tmp_path / "bars.png", title="t"))
    assert plot_policy_bars({}, tmp_path / "none.png") is None


def test_gantt(tmp_path):
    res = make_result(nodes=1, stages=2, requests=[req(1, 0.0, 0.5, 1.0)], ops=[
        op(0, 0, 0.0, 0.5), op(0, 1, 0.5, 1.0, kind=OpKind.BWD, train=True),
        op(0, 0, 1.0, 1.2, kind=OpKind.DECODE), op(0, 0, 9.0, 9.5)])
    assert _is_png(plot_gantt(res, tmp_path / "g.png", seconds=2.0))
    # Nothing within the window -> None.
    late = make_result(requests=[req(1, 0.0)], ops=[op(0, 0, 10.0, 11.0)])
    assert plot_gantt(late, tmp_path / "late.png", seconds=5.0) is None
    assert plot_gantt(make_result(), tmp_path / "empty.png") is None


def test_inference_loss(tmp_path):
    p = plot_inference_loss([mixed_result("a"), make_result("b")], tmp_path / "loss.png", window=2)
    assert _is_png(p)
    assert plot_inference_loss([make_result(requests=[req(1, 0.0, 0.5, 1.0)])],
                               tmp_path / "none.png") is None


def test_latency_cdf(tmp_path):
    assert _is_png(plot_latency_cdf([mixed_result("a"), mixed_result("b")], tmp_path / "cdf.png"))
    assert plot_latency_cdf([make_result(requests=[req(1, 0.0)])], tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_gantt_of_a_large_cluster_shows_its_busiest_nodes_at_a_bounded_size(tmp_path):
    """64 x 4 devices: the picture keeps the 8 busiest nodes (32 rows) and says so."""
    import matplotlib.image as mpimg

    ops = [op(n, s, 0.0, 0.1 + 0.01 * n) for n in range(64) for s in range(4)]
    res = make_result(nodes=64, stages=4, requests=[req(1, 0.0, 0.5, 1.0)], ops=ops)
    path = plot_gantt(res, tmp_path / "big.png", seconds=1.0)
    height, width = mpimg.imread(path).shape[:2]
    small = plot_gantt(make_result(nodes=8, stages=4, requests=[req(1, 0.0, 0.5, 1.0)],
                                   ops=[o for o in ops if o.node < 8]), tmp_path / "small.png", seconds=1.0)
    assert mpimg.imread(small).shape[0] == height < 2000     # 32 rows either way, not 256
    assert width < 2000
