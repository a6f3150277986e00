"""Workload: arrival processes, request traces, length models, task lists and text corpora.

Pure Python + numpy; every random draw comes from a `numpy.random.Generator` passed in.
"""
from lemix.workload.arrivals import gamma_arrivals, poisson_arrivals
from lemix.workload.corpus import (
    DatasetError,
    DatasetSource,
    Sample,
    TextSource,
    Topic,
    TopicDrift,
    builtin_corpus,
    load_jsonl,
    shift_times_s,
)
from lemix.workload.generate import ARRIVALS, make_tasks
from lemix.workload.lengths import FixedLengths, LengthModel, LognormalLengths, TraceLengths
from lemix.workload.trace import Trace, TraceError, read_trace

__all__ = [
    "ARRIVALS",
    "DatasetError",
    "DatasetSource",
    "FixedLengths",
    "LengthModel",
    "LognormalLengths",
    "Sample",
    "TextSource",
    "Topic",
    "TopicDrift",
    "Trace",
    "TraceError",
    "TraceLengths",
    "builtin_corpus",
    "gamma_arrivals",
    "load_jsonl",
    "make_tasks",
    "poisson_arrivals",
    "read_trace",
    "shift_times_s",
]
