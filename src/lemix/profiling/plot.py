"""Measured points against the fitted curves, one panel per stage and op type."""
from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import numpy as np

from lemix.sched.latency import Profile


def _by_first(rows) -> dict[int, list[tuple[float, float]]]:
    """[[C, x, t], ...] -> {C: [(x, t), ...] sorted by x}."""
    out: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for c, x, t in rows:
        out[int(c)].append((float(x), float(t)))
    return {c: sorted(v) for c, v in sorted(out.items())}


def plot_profile(profile: Profile, samples: dict, path) -> Path:
    """Write a PNG (or any format matplotlib infers from `path`'s suffix); returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    ops = ("fwd", "bwd", "decode", "optim")
    S = profile.num_stages
    fig = Figure(figsize=(4 * len(ops), 3.2 * S), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(S, len(ops), squeeze=False)
    for s, st in enumerate(profile.stages):
        rows = samples["stages"][s]
        for j, op in enumerate(ops):
            ax = axes[s][j]
            k = getattr(st, op)
            err = profile.fit_error.get(f"stage{s}.{op}")
            ax.set_title(f"stage {s} {op}" + ("" if err is None else f"  (MAPE {100 * err:.1f}%)"),
                         fontsize=9)
            if op == "optim":
                t = np.asarray(rows["optim"], dtype=float)
                ax.plot(np.arange(len(t)), t * 1e3, "o", label="measured")
                ax.axhline(k.a * 1e3, color="k", lw=1, label="fit a")
                ax.set_xlabel("repeat")
            else:
                for c, pts in _by_first(rows[op]).items():
                    x = np.array([p[0] for p in pts])
                    line, = ax.plot(x, [p[1] * 1e3 for p in pts], "o", ms=4, label=f"C={c}")
                    xs = np.linspace(0, x.max() * 1.05, 50)
                    fit = (k.a + k.b * c + k.c * xs if op == "decode"
                           else k.a + k.b * c * xs + k.c * c * xs * xs)
                    ax.plot(xs, fit * 1e3, "-", lw=1, color=line.get_color())
                ax.set_xlabel("summed KV length K" if op == "decode" else "sequence length l")
            ax.set_ylabel("ms")
            ax.legend(fontsize=7)
    fig.suptitle(f"{profile.model} on {profile.device} ({profile.dtype}): measured vs fitted")
    path = Path(path)
    fig.savefig(path, dpi=100)
    return path
