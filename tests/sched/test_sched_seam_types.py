"""The seam types built once per op or more write their own `__init__` (lemix.types' docstring):
each must take exactly the dataclass fields, in order, with their defaults, and build the same
frozen value the generated one would (equal, hashable, replace-able, picklable, assignment
raising)."""
from __future__ import annotations

import dataclasses
import inspect
import pickle

import pytest

from lemix.sched.scheduler import Plan
from lemix.types import Op, OpKind, OpRecord, OpResult, Outputs, SyncSpec

FAST = (Op, OpResult, OpRecord, Outputs, Plan)


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_init_takes_the_fields_in_order_with_their_defaults(cls):
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    fields = dataclasses.fields(cls)
    assert [p.name for p in params] == [f.name for f in fields]
    for p, f in zip(params, fields):
        assert p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert p.default == (inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default), f.name
        assert f.default_factory is dataclasses.MISSING   # (an own __init__ would not call it)


def _values(cls) -> dict:
    """A distinct value for every field (so a field set under another name would show)."""
    sample = {"kind": OpKind.BWD, "task_ids": (3, 4), "train": True, "sync": SyncSpec(source=1),
              "layers": (2, 5), "cuts": (3,), "stopped_task_ids": (9,), "error": "boom",
              "wakeup_s": 2.5, "ops": (), "outputs": Outputs(requeued=(7,))}
    out = {}
    for i, f in enumerate(dataclasses.fields(cls)):
        if f.name in sample:
            out[f.name] = sample[f.name]
        elif f.name.endswith("_s"):
            out[f.name] = 0.25 + i
        elif f.type.startswith("tuple"):
            out[f.name] = (i, i + 1)
        else:
            out[f.name] = 10 + i
    return out


@pytest.mark.parametrize("cls", FAST, ids=lambda c: c.__name__)
def test_instances_behave_as_frozen_dataclasses(cls):
    vals = _values(cls)
    a = cls(**vals)
    b = cls(*vals.values())
    assert a == b and hash(a) == hash(b)
    assert dataclasses.asdict(a) == dataclasses.asdict(b)
    assert {f.name: getattr(a, f.name) for f in dataclasses.fields(cls)} == vals
    assert pickle.loads(pickle.dumps(a)) == a
    first = dataclasses.fields(cls)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(a, first, 1)
    changed = dataclasses.replace(a, **{first: 99})
    assert changed != a and getattr(changed, first) == 99
    assert dataclasses.replace(changed, **{first: vals[first]}) == a
    assert repr(a).startswith(cls.__name__ + "(")


def test_defaults_match_the_declared_ones():
    op = Op(1, OpKind.FWD, 0, 1, 2, (5,), False)
    assert (op.batch_size, op.seq_tokens, op.kv_tokens, op.bytes, op.predicted_s, op.sync, op.layers,
            op.cuts) == (1, 0, 0, 0, 0.0, None, (), ())
    assert OpResult(3, 0.0, 1.0).stopped_task_ids == () and OpResult(3, 0.0, 1.0).error is None
    assert Outputs() == Outputs((), (), (), (), (), (), (), ()) and not Outputs()
    assert Plan().outputs == Outputs() and Plan().ops == () and Plan().wakeup_s is None
