"""The state dir at start-up and under a full disk, without a server: the journal is relocatable
and refuses to start when it cannot be trusted; a damaged checkpoint falls back to the newest
intact one; storage errors keep their real cause; failed writes leave no temporary files."""
from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch

from lemix.serve import checkpoint as ckpt
from lemix.serve.journal import Journal, JournalStorageError
from lemix.serve.state import ServeError, choose_checkpoints, open_journal

MODEL = "builtin-tiny"


def state_of(seed: int):
    g = torch.Generator().manual_seed(seed)
    return SimpleNamespace(weights={"w": torch.randn(64, 64, generator=g)}, optimizer={"state": {}, "param_groups": []})


def make_state(root, versions=(1, 2), node=0):
    """A state dir whose journal records checkpoints `versions` of `node` (real files)."""
    journal = open_journal(root, resume=False)
    journal.add([({"text": "a"}, 2)], version=0)
    for v in versions:
        ckpt.write_node([state_of(v)], journal, root / "checkpoints", node, v, MODEL, keep=3)
    return journal


def test_journal_paths_are_relative_so_a_copied_state_dir_keeps_its_own_checkpoints(tmp_path):
    a, b = tmp_path / "A", tmp_path / "B"
    make_state(a).close()
    shutil.copytree(a, b)
    jb = open_journal(b, resume=True)
    assert [p for _, p in jb.checkpoints(0)] == [b / "checkpoints/node0/v00000001", b / "checkpoints/node0/v00000002"]
    # B writes and prunes: A's checkpoints are untouched
    ckpt.write_node([state_of(3)], jb, b / "checkpoints", 0, 3, MODEL, keep=1)
    jb.close()
    assert sorted(p.name for p in (a / "checkpoints/node0").iterdir()) == ["v00000001", "v00000002"]
    assert sorted(p.name for p in (b / "checkpoints/node0").iterdir()) == ["v00000003"]
    ja = open_journal(a, resume=True)
    assert choose_checkpoints(ja, 1, 1, MODEL)[0] == (2, a / "checkpoints/node0/v00000002")
    ja.close()


def test_absolute_paths_of_older_journals_are_rerooted_at_this_state_dir(tmp_path):
    journal = make_state(tmp_path / "A", versions=(1,))
    journal._db().execute("UPDATE checkpoints SET path=?", (str(tmp_path / "elsewhere/checkpoints/node0/v00000001"),))
    assert journal.checkpoints(0) == [(1, tmp_path / "A/checkpoints/node0/v00000001")]
    journal.close()


def test_an_empty_journal_beside_checkpoints_refuses_to_start_and_says_how_to_recover(tmp_path):
    make_state(tmp_path).close()
    for suffix in ("-wal", "-shm"):
        (tmp_path / f"journal.sqlite{suffix}").unlink(missing_ok=True)
    (tmp_path / "journal.sqlite").write_bytes(b"")          # 0 bytes
    with pytest.raises(ServeError, match=r"records no training.*node 0: v1, v2.*Restore journal.sqlite"):
        open_journal(tmp_path, resume=True)


def test_a_malformed_journal_is_a_serve_error(tmp_path):
    (tmp_path / "journal.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ServeError, match="cannot open the journal"):
        open_journal(tmp_path, resume=True)


def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one(tmp_path, caplog):
    journal = make_state(tmp_path, versions=(1, 2, 3))
    newest = tmp_path / "checkpoints/node0/v00000003/stage0.pt"
    newest.write_bytes(newest.read_bytes()[:1000])            # truncated
    (tmp_path / "checkpoints/node0/v00000002/stage0.pt").unlink()   # missing
    with caplog.at_level("WARNING"):
        chosen = choose_checkpoints(journal, 1, 1, MODEL)
    assert chosen == {0: (1, tmp_path / "checkpoints/node0/v00000001")}
    assert "checksum" in caplog.text and "falling back to v1" in caplog.text
    assert journal.checkpoints(0) == [(1, tmp_path / "checkpoints/node0/v00000001")]
    assert (tmp_path / "checkpoints/node0/v00000003.corrupt").is_dir()   # moved aside, not deleted
    journal.close()


def test_no_intact_checkpoint_refuses_to_start(tmp_path):
    journal = make_state(tmp_path, versions=(1,))
    shutil.rmtree(tmp_path / "checkpoints/node0/v00000001")
    with pytest.raises(ServeError, match=r"node 0: no checkpoint .*\(v1 .*missing.*backup"):
        choose_checkpoints(journal, 1, 1, MODEL)
    journal.close()


def test_a_full_database_raises_its_real_cause_and_the_next_write_works(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")
    db = journal._db()
    pages = db.execute("PRAGMA page_count").fetchone()[0]
    db.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(JournalStorageError, match="database or disk is full") as info:
        journal.add([({"text": "x" * 50_000}, 9)] * 4, version=0)
    assert info.value.full and "cannot rollback" not in str(info.value)
    assert journal.counts() == {"queued": 0, "applied": 0}    # nothing half-accepted
    assert len(journal.add([({"text": "small"}, 3)], version=0)) == 1
    journal.close()


def test_a_failed_checkpoint_write_leaves_no_temporary_directory(tmp_path):
    journal = Journal(tmp_path / "journal.sqlite")

    class Unpicklable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")
    bad = SimpleNamespace(weights={"w": Unpicklable()}, optimizer={})
    with pytest.raises(OSError, match="No space left"):
        ckpt.write_node([bad], journal, tmp_path / "checkpoints", 0, 5, MODEL)
    assert list((tmp_path / "checkpoints/node0").iterdir()) == []
    assert journal.checkpoints(0) == []
    journal.close()


def test_an_unwritable_state_dir_is_a_serve_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ServeError, match="cannot create the state dir"):
        open_journal(blocker / "state", resume=False)
