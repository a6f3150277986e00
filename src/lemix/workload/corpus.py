"""Real text for the real engine: a built-in drifting corpus and user JSONL datasets.

Both sources offer `sample_text(t_s, n_chars, rng) -> str`, so continuous training can draw text
that depends on the (simulated or wall) time of the run without knowing where it comes from.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np

from lemix.workload.errors import InputFileError, file_lines


@dataclass(frozen=True)
class Topic:
    name: str
    text: str


@dataclass(frozen=True)
class Sample:
    """One dataset record. `prompt` is the leading part of `text` ("" for plain-text records)."""

    text: str
    prompt: str = ""
    segment: str | None = None   # drift segment label (a dataset's optional "segment" key)

    @property
    def completion(self) -> str:
        return self.text[len(self.prompt):]


class DatasetError(InputFileError):
    """A dataset file that cannot be read; names the file and (when known) the 1-based line."""


@runtime_checkable
class TextSource(Protocol):
    def sample_text(self, t_s: float, n_chars: int, rng: np.random.Generator) -> str:
        """Text to train on at time t_s, at most n_chars characters."""
        ...


def shift_times_s(source: object) -> tuple[float, ...]:
    """When a source's text distribution shifts (seconds from the run's start); () for none."""
    return tuple(getattr(source, "shift_times_s", ()))


def _check_n_chars(n_chars: int) -> int:
    if isinstance(n_chars, bool) or not isinstance(n_chars, (int, np.integer)) or n_chars < 1:
        raise ValueError(f"n_chars must be an integer >= 1, got {n_chars!r}")
    return int(n_chars)


# --------------------------------------------------------------------------- built-in corpus

def builtin_corpus(*, dedupe: bool = True) -> list[Topic]:
    """Python's own reference-manual topics (`pydoc_data.topics`, ~465 KB of English), by name.

    Umbrella topics repeat others verbatim ('compound' holds 'try', 'for', ...; 'specialnames'
    holds 'customization', ...). With `dedupe`, each paragraph (blank-line separated) is kept
    only in the shortest topic that has it, so held-out text of one topic is not training text of
    another; topics left empty are dropped.
    """
    from pydoc_data.topics import topics

    names = sorted(topics)
    if not dedupe:
        return [Topic(n, topics[n].strip()) for n in names if topics[n].strip()]
    seen: set[str] = set()
    kept: dict[str, str] = {}
    for name in sorted(names, key=lambda n: (len(topics[n]), n)):
        paragraphs = []
        for para in topics[name].strip().split("\n\n"):
            key = para.strip()
            if key and key not in seen:
                seen.add(key)
                paragraphs.append(para)
        kept[name] = "\n\n".join(paragraphs).strip()
    return [Topic(n, kept[n]) for n in names if kept[n]]


def _split_point(text: str, heldout_frac: float) -> int:
    """Index where a topic's held-out tail starts: at a whitespace near (1 - frac) of the text."""
    cut = int(round(len(text) * (1.0 - heldout_frac)))
    cut = min(max(cut, 1), len(text) - 1)
    space = text.find(" ", cut)
    return cut if space < 0 or space >= len(text) - 1 else space + 1


class TopicDrift:
    """Text whose topic group changes over the run: group k during [k*D/G, (k+1)*D/G).

    Topics are shuffled by `rng` and dealt to the `groups` groups, each topic to the group with
    the fewest characters so far, so groups are of similar size. The last `heldout_frac` of each
    topic's text (cut at a space) is held out: `sample_text` never returns it, `heldout_text`
    returns only it, so loss on it measures unseen text of the same topics.
    """

    SEPARATOR = "\n\n"

    def __init__(
        self,
        topics: Sequence[Topic],
        groups: int = 4,
        *,
        duration_s: float,
        rng: np.random.Generator,
        heldout_frac: float = 0.1,
    ) -> None:
        if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {groups!r}")
        if len(topics) < groups:
            raise ValueError(f"need at least {groups} topics for {groups} groups, got {len(topics)}")
        if not (np.isfinite(duration_s) and duration_s > 0):
            raise ValueError(f"duration_s must be finite and > 0, got {duration_s!r}")
        if not (0.0 < heldout_frac < 1.0):
            raise ValueError(f"heldout_frac must be in (0, 1), got {heldout_frac!r}")
        if any(len(t.text) < 2 for t in topics):
            raise ValueError("every topic needs at least 2 characters of text")
        self.duration_s = float(duration_s)
        self.groups = int(groups)

        members: list[list[Topic]] = [[] for _ in range(self.groups)]
        sizes = [0] * self.groups
        for i in rng.permutation(len(topics)):
            k = int(np.argmin(sizes))
            members[k].append(topics[i])
            sizes[k] += len(topics[i].text)
        self.group_topics: list[tuple[str, ...]] = [tuple(t.name for t in m) for m in members]

        self._train: list[str] = []
        self._heldout: list[str] = []
        for m in members:
            cuts = [_split_point(t.text, heldout_frac) for t in m]
            self._train.append(self.SEPARATOR.join(t.text[:c] for t, c in zip(m, cuts)))
            self._heldout.append(self.SEPARATOR.join(t.text[c:] for t, c in zip(m, cuts)))

    @property
    def shift_times_s(self) -> tuple[float, ...]:
        """When the active group changes: k * D / G for k = 1..G-1."""
        return tuple(k * self.duration_s / self.groups for k in range(1, self.groups))

    def group_at(self, t_s: float) -> int:
        """The active group at time t_s; before 0 it is group 0, from duration_s on the last."""
        k = int(np.floor(t_s * self.groups / self.duration_s))
        return min(max(k, 0), self.groups - 1)

    def train_text(self, group: int) -> str:
        """All text `sample_text` may draw from for `group` (topics joined by blank lines)."""
        return self._train[self._check_group(group)]

    def heldout_chars(self, group: int) -> int:
        return len(self._heldout[self._check_group(group)])

    def sample_text(self, t_s: float, n_chars: int, rng: np.random.Generator) -> str:
        """A window of n_chars characters at a uniform offset in the current group's text.

        A uniform offset picks a topic with probability proportional to its length. The window
        wraps around to the group's first topic, so it always has exactly n_chars characters.
        """
        n = _check_n_chars(n_chars)
        text = self._train[self.group_at(t_s)]
        start = int(rng.integers(0, len(text)))
        if start + n <= len(text):
            return text[start:start + n]
        return (text * ((start + n) // len(text) + 1))[start:start + n]

    def heldout_text(self, group: int, n_chars: int | None = None) -> str:
        """The first n_chars of the group's held-out text (all of it when None); deterministic."""
        text = self._heldout[self._check_group(group)]
        if n_chars is None:
            return text
        n = _check_n_chars(n_chars)
        if n > len(text):
            raise ValueError(f"group {group} has only {len(text)} held-out characters, asked {n}")
        return text[:n]

    def _check_group(self, group: int) -> int:
        if isinstance(group, bool) or not isinstance(group, (int, np.integer)) \
                or not 0 <= group < self.groups:
            raise ValueError(f"group must be in [0, {self.groups}), got {group!r}")
        return int(group)


# --------------------------------------------------------------------------- JSONL datasets

def _parse_record(path: str | Path, line: int, text: str) -> Sample:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DatasetError(path, line, f"malformed JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise DatasetError(path, line, f"expected a JSON object, got {type(obj).__name__}")
    segment = obj.get("segment")
    if segment is not None and (isinstance(segment, bool) or not isinstance(segment, (str, int))):
        raise DatasetError(path, line, f"'segment' must be a string or an integer, got {type(segment).__name__}")
    sample = _parse_body(path, line, obj)
    return sample if segment is None else replace(sample, segment=str(segment))


def _parse_body(path: str | Path, line: int, obj: dict) -> Sample:
    if "text" in obj:
        if "prompt" in obj or "completion" in obj:
            raise DatasetError(path, line, "give either 'text' or 'prompt'+'completion', not both")
        body = obj["text"]
        if not isinstance(body, str):
            raise DatasetError(path, line, f"'text' must be a string, got {type(body).__name__}")
        if not body.strip():
            raise DatasetError(path, line, "empty text")
        return Sample(text=body)
    if "prompt" in obj and "completion" in obj:
        prompt, completion = obj["prompt"], obj["completion"]
        for key, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, str):
                raise DatasetError(path, line, f"{key!r} must be a string, got {type(value).__name__}")
        if not completion.strip():
            raise DatasetError(path, line, "empty completion")
        return Sample(text=prompt + completion, prompt=prompt)
    raise DatasetError(path, line, f"expected key 'text' or keys 'prompt' and 'completion', "
                                   f"got keys {sorted(obj)}")


def load_jsonl(path: str | Path) -> list[Sample]:
    """Read a JSONL dataset: one `{"text": ...}` or `{"prompt": ..., "completion": ...}` a line.

    A record may carry `"segment": label` (drift segments, see DatasetSource); then every
    record must. Blank lines are skipped; other keys on a record are ignored.
    """
    samples: list[Sample] = []
    first_labelled: bool | None = None
    for number, text in file_lines(path, DatasetError, "dataset"):
        if text.strip():
            sample = _parse_record(path, number, text)
            labelled = sample.segment is not None
            if first_labelled is None:
                first_labelled = labelled
            elif labelled != first_labelled:
                raise DatasetError(path, number, "'segment' is given on some records but not on this one: "
                                                 "give it on every record or on none")
            samples.append(sample)
    if not samples:
        raise DatasetError(path, None, "empty dataset: no records")
    return samples


class DatasetSource:
    """Cycles through dataset samples in order; each call returns the next one.

    `sample_text` returns the sample's first n_chars characters (the whole sample when shorter);
    it ignores rng, which it takes only to share TopicDrift's interface. Samples with segment
    labels drift: the G segments (in order of first appearance) take equal spans of the run,
    segment k during [k*D/G, (k+1)*D/G) (needs `duration_s`), and calls cycle through the samples
    of the segment active at t_s. Without labels t_s is ignored.
    """

    def __init__(self, samples: Sequence[Sample], *, duration_s: float | None = None) -> None:
        if not samples:
            raise ValueError("DatasetSource needs at least one sample")
        self.samples = list(samples)
        labels = list(dict.fromkeys(s.segment for s in self.samples if s.segment is not None))
        self._segments = [[s for s in self.samples if s.segment == label] for label in labels] \
            or [self.samples]
        self.segment_labels: tuple[str, ...] = tuple(labels)
        if len(self._segments) > 1 and not (duration_s is not None and np.isfinite(duration_s)
                                            and duration_s > 0):
            raise ValueError(f"a dataset with segments needs duration_s > 0, got {duration_s!r}")
        self.duration_s = duration_s
        self._next = [0] * len(self._segments)

    @property
    def shift_times_s(self) -> tuple[float, ...]:
        G = len(self._segments)
        return tuple(k * self.duration_s / G for k in range(1, G)) if G > 1 else ()

    def segment_at(self, t_s: float) -> int:
        G = len(self._segments)
        if G == 1:
            return 0
        return min(max(int(np.floor(t_s * G / self.duration_s)), 0), G - 1)

    def sample_text(self, t_s: float, n_chars: int, rng: np.random.Generator) -> str:
        n = _check_n_chars(n_chars)
        k = self.segment_at(t_s)
        pool = self._segments[k]
        sample = pool[self._next[k]]
        self._next[k] = (self._next[k] + 1) % len(pool)
        return sample.text[:n]
