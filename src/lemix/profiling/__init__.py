"""Profiling (DESIGN section 4): measure op latencies and memory on the real stage workers, fit
the scheduler's latency model, and store the result as a versioned JSON profile.

    profile, samples = measure_profile(workers, model_name=..., device=..., capacity_bytes=...)
    save_profile(profile, "profile.json", samples)
    profile = load_profile("profile.json", stages=2)

Importing this package costs numpy/scipy only: measuring (torch) and plotting (matplotlib) are
imported on first use, so the simulator can read a profile without loading torch.
"""
from __future__ import annotations

from lemix.profiling.fit import ProfileError, fit_const, fit_decode, fit_fwd
from lemix.profiling.store import FORMAT, VERSION, load_profile, remap_stages, save_profile

__all__ = ["FORMAT", "VERSION", "ProfileError", "fit_const", "fit_decode", "fit_fwd",
           "grid_size", "load_profile", "measure_profile", "plot_profile", "remap_stages",
           "save_profile"]


_LAZY = {"measure_profile": "measure", "grid_size": "measure", "plot_profile": "plot"}


def __getattr__(name: str):
    """measure_profile / grid_size (torch) and plot_profile (matplotlib), imported on first use."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"lemix.profiling.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'lemix.profiling' has no attribute {name!r}")
