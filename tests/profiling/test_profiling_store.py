"""Profile files: round trip, version check, and refusing a profile made for another run."""
import json
from dataclasses import replace

import pytest

from lemix import __version__
from lemix.profiling import ProfileError, load_profile, remap_stages, save_profile
from lemix.sched.latency import default_profile


def make_profile(stages: int = 2):
    p = default_profile(model="tiny", stages=stages, capacity_bytes=8 * 10**9)
    return replace(p, model="builtin-tiny", device="cpu", dtype="float32",
                   fit_error={f"stage{s}.fwd": 0.01 * (s + 1) for s in range(stages)})


def test_round_trip(tmp_path):
    p = make_profile()
    samples = {"stages": [{"fwd": [[1, 16, 0.001]]}, {"fwd": [[1, 16, 0.002]]}]}
    path = tmp_path / "p.json"
    save_profile(p, path, samples)
    assert load_profile(path, stages=2, model="builtin-tiny", device="cpu") == p
    data = json.loads(path.read_text())
    assert (data["format"], data["version"]) == ("lemix-profile", 1)
    assert data["created_by"] == f"lemix {__version__}"
    assert data["samples"] == samples
    assert data["stages"][0]["fwd"] == {"a": p.stages[0].fwd.a, "b": p.stages[0].fwd.b,
                                        "c": p.stages[0].fwd.c}


def test_capacity_override(tmp_path):
    save_profile(make_profile(), tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json", stages=2, capacity_bytes=123).capacity_bytes == 123


def _rewrite(path, **fields):
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def test_future_version_refused(tmp_path):
    path = tmp_path / "p.json"
    save_profile(make_profile(), path)
    _rewrite(path, version=2)
    with pytest.raises(ProfileError, match=r"p\.json.*version 2"):
        load_profile(path, stages=2)
    _rewrite(path, version="one")
    with pytest.raises(ProfileError, match="unknown format version"):
        load_profile(path, stages=2)
    _rewrite(path, version=1, format="something-else")
    with pytest.raises(ProfileError, match="not a lemix profile"):
        load_profile(path, stages=2)


def test_unreadable_files(tmp_path):
    with pytest.raises(ProfileError, match="no such file"):
        load_profile(tmp_path / "missing.json", stages=2)
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ProfileError, match="JSON"):
        load_profile(tmp_path / "bad.json", stages=2)
    save_profile(make_profile(), tmp_path / "p.json")
    _rewrite(tmp_path / "p.json", stages=[{"fwd": {}}])
    with pytest.raises(ProfileError, match="malformed"):
        load_profile(tmp_path / "p.json", stages=1)


@pytest.mark.parametrize("kwargs, what", [
    (dict(stages=3), "2 stages, the run has 3"),
    (dict(stages=2, model="other"), "model 'builtin-tiny', the run uses 'other'"),
    (dict(stages=2, device="cuda"), "device 'cpu', the run uses 'cuda'"),
])
def test_mismatch_refused_unless_forced(tmp_path, kwargs, what):
    path = tmp_path / "p.json"
    p = make_profile()
    save_profile(p, path)
    with pytest.raises(ProfileError, match="--force-profile") as exc:
        load_profile(path, **kwargs)
    assert what in str(exc.value)
    with pytest.warns(UserWarning, match="forced"):
        got = load_profile(path, force=True, **kwargs)
    assert got.num_stages == kwargs["stages"]
    if kwargs["stages"] == 2:
        assert got == p                       # model / device mismatch: accepted as is


def test_remap_keeps_model_totals():
    p = make_profile(stages=2)
    for n in (1, 3, 4):
        q = remap_stages(p, n)
        assert q.num_stages == n
        for attr in ("weight_bytes", "kv_bytes_per_token", "act_bytes_per_token"):
            assert sum(getattr(s, attr) for s in q.stages) == pytest.approx(
                sum(getattr(s, attr) for s in p.stages), abs=n)
        assert sum(s.fwd.b for s in q.stages) == pytest.approx(sum(s.fwd.b for s in p.stages))
        assert sum(s.optim.a for s in q.stages) == pytest.approx(sum(s.optim.a for s in p.stages))
        a_range = (min(s.fwd.a for s in p.stages), max(s.fwd.a for s in p.stages))
        assert all(a_range[0] - 1e-15 <= s.fwd.a <= a_range[1] + 1e-15 for s in q.stages)
    assert remap_stages(p, 2) == p


def test_reading_a_profile_does_not_import_torch():
    """The simulator reads profiles: lemix.profiling loads torch / matplotlib only to measure/plot."""
    import subprocess
    import sys

    code = ("import sys, lemix.profiling as p; p.load_profile; "
            "bad = [m for m in ('torch', 'matplotlib') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)
