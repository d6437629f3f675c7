"""The stored-response chain (response_store.py): each record holds only its own turn and a link to the turn it
continued, so a chain's storage grows with its length, not its square; a chain stays whole while any of its later
turns is visible, whatever happened to the earlier ones (deleted, past their 30 days); what nothing continues goes
at once (delete) or at the next purge."""

from __future__ import annotations

import sqlite3

import openai
import pytest

from glm_serve.api.response_store import ResponseStore, StoredResponse

M = "glm-4-tiny"


def _turn(n: int, parent: str | None, status: str = "completed", inherited=([], [])) -> StoredResponse:
    text = f"question {n} " + "x" * 200
    return StoredResponse(f"resp_{n}", None, {"id": f"resp_{n}", "status": status, "output": [{"id": f"out_{n}"}]},
                          parent, [{"id": f"in_{n}", "text": text}],
                          [{"role": "user", "content": text}, {"role": "assistant", "content": f"answer {n}"}],
                          inherited)


def _want(n: int, first: int = 0) -> tuple[list[dict], list[dict]]:
    """continuation() of turn n of a whole chain: every message, every item with every output."""
    messages, items = [], []
    for k in range(first, n + 1):
        messages += _turn(k, None).messages
        items += [{"id": f"in_{k}", "text": f"question {k} " + "x" * 200}, {"id": f"out_{k}"}]
    return messages, items


def _rows(path) -> dict[str, int]:
    db = sqlite3.connect(path)
    try:
        return {rid: size for rid, size in
                db.execute("SELECT id, length(items) + length(messages) + length(response) FROM responses")}
    finally:
        db.close()


@pytest.fixture
def clock():
    return [1000.0]


@pytest.fixture
def store(tmp_path, clock):
    s = ResponseStore(tmp_path / "r.sqlite3", ttl_s=100, clock=lambda: clock[0])
    yield s
    s.close()


def test_a_chain_takes_space_in_its_length(store, tmp_path):
    for n in range(30):
        store.put(_turn(n, f"resp_{n - 1}" if n else None))
    assert store.continuation("resp_29", None) == _want(29)
    assert store.input_items("resp_29", None) == _want(28)[1] + [{"id": "in_29", "text": "question 29 " + "x" * 200}]
    sizes = _rows(tmp_path / "r.sqlite3")
    assert max(sizes.values()) < 1.2 * min(sizes.values())  # (copied whole, turn 29 held 30 turns)


def test_a_deleted_turn_still_carries_the_turns_after_it(store, tmp_path):
    for n in range(4):
        store.put(_turn(n, f"resp_{n - 1}" if n else None))
    assert store.delete("resp_1", None)
    assert store.response("resp_1", None) is None and store.continuation("resp_1", None) is None
    assert not store.delete("resp_1", None)  # gone for every caller
    assert store.continuation("resp_3", None) == _want(3)  # still whole
    assert set(_rows(tmp_path / "r.sqlite3")) == {"resp_0", "resp_1", "resp_2", "resp_3"}  # kept for them
    assert store.delete("resp_3", None)  # a leaf: gone at once
    assert store.delete("resp_2", None)  # and with it the deleted turn nothing continues any more
    assert set(_rows(tmp_path / "r.sqlite3")) == {"resp_0"}
    assert store.continuation("resp_0", None) == _want(0)


def test_a_turn_past_its_days_is_kept_for_a_younger_one(store, tmp_path, clock):
    store.put(_turn(0, None))
    clock[0] += 60
    store.put(_turn(1, "resp_0"))  # turn 0 is now kept until turn 1's end
    clock[0] += 60  # turn 0's 100 s are over, turn 1's not
    assert store.response("resp_0", None) is None and store.continuation("resp_0", None) is None
    assert store.purge() == 0 and store.continuation("resp_1", None) == _want(1)
    clock[0] += 60
    assert store.purge() == 2 and _rows(tmp_path / "r.sqlite3") == {}


def test_a_turn_whose_parent_went_while_it_ran_is_stored_whole(store):
    # previous_response_id read, then deleted (nothing continued it yet) before this response ended: the
    # conversation read at the start is stored with it
    store.put(_turn(0, None))
    store.put(_turn(1, "resp_0"))
    before = store.continuation("resp_1", None)
    assert store.delete("resp_1", None) and store.response("resp_1", None) is None
    store.put(_turn(2, "resp_1", inherited=before))
    assert store.continuation("resp_2", None) == _want(2)
    assert store.input_items("resp_2", None) == _want(1)[1] + [{"id": "in_2", "text": "question 2 " + "x" * 200}]


def test_a_failed_turn_carries_its_input_not_its_output(store):
    store.put(_turn(0, None, status="failed"))
    failed = _turn(0, None)
    store.put(StoredResponse("resp_1", None, {"id": "resp_1", "status": "completed", "output": [{"id": "out_1"}]},
                             "resp_0", [{"id": "in_1"}], []))
    assert store.continuation("resp_1", None)[1] == [failed.items[0], {"id": "in_1"}, {"id": "out_1"}]


def test_deleting_a_middle_turn_through_the_sdk(server):
    # The same through the API: the deleted turn is a 404 (and a 400 as previous_response_id), the turns after it
    # continue, list and retrieve as before
    client = openai.OpenAI(api_key="unused", base_url=server.openai_base, max_retries=0)
    r1 = client.responses.create(model=M, input="one", max_output_tokens=2)
    r2 = client.responses.create(model=M, input="two", previous_response_id=r1.id, max_output_tokens=2)
    r3 = client.responses.create(model=M, input="three", previous_response_id=r2.id, max_output_tokens=2)
    items = [i.id for i in client.responses.input_items.list(r3.id, order="asc")]
    client.responses.delete(r2.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r2.id)
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=M, input="x", previous_response_id=r2.id, max_output_tokens=2)
    assert [i.id for i in client.responses.input_items.list(r3.id, order="asc")] == items
    r4 = client.responses.create(model=M, input="four", previous_response_id=r3.id, max_output_tokens=2)
    assert len(list(client.responses.input_items.list(r4.id))) == len(items) + 2  # r3's output, r4's input


def test_an_id_stored_already_is_refused_and_changes_nothing(store):
    # Replacing a record would change the conversation of the ones continuing it (or loop the chain)
    store.put(_turn(0, None))
    store.put(_turn(1, "resp_0"))
    with pytest.raises(ValueError):
        store.put(_turn(0, "resp_1"))
    assert store.continuation("resp_1", None) == _want(1)


def test_a_failed_write_leaves_no_transaction_open_and_names_its_error(store, monkeypatch):
    # A full disk: sqlite has rolled back by itself, so the error raised is the disk's, not a failed ROLLBACK's;
    # the next write works
    pages = store._db.execute("PRAGMA page_count").fetchone()[0]
    store._db.execute(f"PRAGMA max_page_count = {pages + 2}")
    with pytest.raises(sqlite3.OperationalError, match="full"):
        store.put(StoredResponse("resp_big", None, {"id": "resp_big"}, None, [{"x": "y" * 100_000}], []))
    store._db.execute("PRAGMA max_page_count = 1073741823")
    store.put(_turn(0, None))
    assert store.continuation("resp_0", None) == _want(0) and store.response("resp_big", None) is None


def test_a_failed_commit_is_rolled_back(tmp_path):
    from glm_serve.api import response_store

    class FailingCommit:  # a connection whose COMMIT fails (sqlite: busy, a full disk as the WAL is written)
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if sql == "COMMIT":
                raise sqlite3.OperationalError("disk I/O error")
            return self.db.execute(sql, *args)

        in_transaction = property(lambda self: self.db.in_transaction)

    db = sqlite3.connect(tmp_path / "x.sqlite3", isolation_level=None)
    db.execute("CREATE TABLE t (x)")
    with pytest.raises(sqlite3.OperationalError):
        with response_store._transaction(FailingCommit(db)):
            db.execute("INSERT INTO t VALUES (1)")
    assert not db.in_transaction and db.execute("SELECT count(*) FROM t").fetchone() == (0,)
    with response_store._transaction(db):  # the next one begins
        db.execute("INSERT INTO t VALUES (2)")
    assert db.execute("SELECT x FROM t").fetchall() == [(2,)]
    db.close()


def test_a_turn_extends_the_chain_before_it_once_a_step(tmp_path, clock):
    # With keep_until rounded up (the server's hour), a chain's turns within one step extend only their parent:
    # a put costs the same at turn 5000 as at turn 2; the first turn of the next step extends the whole chain
    s = ResponseStore(tmp_path / "r.sqlite3", ttl_s=100, clock=lambda: clock[0], keep_step_s=50)
    try:
        for n in range(5):
            clock[0] += 1
            s.put(_turn(n, f"resp_{n - 1}" if n else None))
        db = sqlite3.connect(tmp_path / "r.sqlite3")
        keep = dict(db.execute("SELECT id, keep_until FROM responses"))
        assert set(keep.values()) == {1150.0}  # 1105 rounded up
        clock[0] += 50
        s.put(_turn(5, "resp_4"))
        assert dict(db.execute("SELECT id, keep_until FROM responses")) == {**keep, **dict.fromkeys(keep, 1200.0),
                                                                            "resp_5": 1200.0}
        db.close()
        assert s.continuation("resp_5", None) == _want(5)
    finally:
        s.close()
