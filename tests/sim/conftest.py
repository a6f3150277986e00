"""Simulator tests share the scheduler tests' factories (tests/sched/sched_factory.py)."""
import sys
from pathlib import Path

_SCHED = str(Path(__file__).resolve().parents[1] / "sched")
if _SCHED not in sys.path:
    sys.path.insert(0, _SCHED)
