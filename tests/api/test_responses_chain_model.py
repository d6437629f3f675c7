"""The stored-response chain (response_store.py) against a model that copies each response's whole conversation:
random puts (a follow-up of any response visible when its request began, which may be deleted, expire or be purged
before it ends), deletes, clock moves (backwards too), purges and reopenings. After each step every response reads
as the model says (or not at all), and the file holds no record that no visible response needs."""

from __future__ import annotations

import math
import random
import sqlite3

import pytest

from glm_serve.api.response_store import ResponseStore, StoredResponse

TTL = 100.0
OWNERS = (None, "a", "b")


def _can_see(owner, caller) -> bool:
    return caller is None or owner is None or owner == caller


class _Model:
    def __init__(self, step: float):
        self.step, self.nodes, self.gone = step, {}, set()

    def visible(self, rid: str, now: float, caller=None) -> bool:
        n = self.nodes[rid]
        return rid not in self.gone and not n["deleted"] and n["expires"] > now and _can_see(n["owner"], caller)

    def keep(self, rid: str) -> float:
        """How long the record is needed (its latest living descendant's days, rounded as the store rounds)."""
        best, todo = -math.inf, [rid]
        while todo:
            k = todo.pop()
            n = self.nodes[k]
            if k not in self.gone and not n["deleted"]:
                best = max(best, math.ceil(n["expires"] / self.step) * self.step if self.step else n["expires"])
            todo += n["children"]
        return best

    def needed(self, now: float) -> set[str]:
        """The visible responses and every record their chains go through."""
        out = set()
        for rid in self.nodes:
            if self.visible(rid, now):
                while rid is not None and rid not in out:  # it, then every record its chain goes through
                    out.add(rid)
                    rid = self.nodes[rid]["link"]
        return out


def _open(path, clock, step) -> ResponseStore:
    store = ResponseStore(path, ttl_s=TTL, clock=lambda: clock[0], keep_step_s=step)
    store._db.execute("PRAGMA synchronous=OFF")  # (no fsync per commit: the test is about logic, not power loss)
    return store


def _physical(path) -> set[str]:
    db = sqlite3.connect(path)
    try:
        return {r for (r,) in db.execute("SELECT id FROM responses")}
    finally:
        db.close()


def _run(seed: int, tmp_path) -> None:
    rnd = random.Random(seed)
    step = rnd.choice([0.0, 0.0, 7.0, 30.0])
    clock = [1000.0]
    path = tmp_path / f"r{seed}.sqlite3"
    store = _open(path, clock, step)
    model = _Model(step)
    pending = []  # requests begun: (id, owner, parent, captured conversation)
    serial = 0
    try:
        for _ in range(rnd.randint(40, 90)):
            op, cleaned = rnd.random(), False  # cleaned: a purge ran (the store purges as it deletes)
            now = clock[0]
            if op < 0.3:  # a request begins: a new conversation or a follow-up of one the caller sees now
                serial += 1
                rid = f"resp_{serial}"
                shown = [k for k in model.nodes if model.visible(k, now)]
                parent = rnd.choice(shown) if shown and rnd.random() < 0.8 else None
                if parent is None:
                    owner, captured = rnd.choice(OWNERS), ([], [])
                else:
                    owner = rnd.choice([o for o in OWNERS if _can_see(model.nodes[parent]["owner"], o)])
                    captured = store.continuation(parent, owner)
                    assert captured == model.nodes[parent]["continuation"], (seed, parent)
                pending.append((rid, owner, parent, captured))
            elif op < 0.55 and pending:  # one ends and is stored
                rid, owner, parent, captured = pending.pop(rnd.randrange(len(pending)))
                failed = rnd.random() < 0.15
                response = {"id": rid, "status": "failed" if failed else "completed",
                            "output": [{"id": f"out_{rid}", "text": "o" * rnd.randint(0, 50)}]}
                items = [{"id": f"in_{rid}_{k}"} for k in range(rnd.randint(0, 2))]
                messages = [{"role": "user", "content": f"{rid} {k}"} for k in range(rnd.randint(0, 2))]
                store.put(StoredResponse(rid, owner, response, parent, items, messages, captured))
                linked = parent if parent is not None and parent in _physical(path) else None
                model.nodes[rid] = {
                    "owner": owner, "deleted": False, "expires": now + TTL, "children": [], "link": linked,
                    "response": response, "input_items": captured[1] + items,
                    "continuation": (captured[0] + messages,
                                     captured[1] + items + ([] if failed else response["output"]))}
                if linked is not None:
                    model.nodes[linked]["children"].append(rid)
            elif op < 0.7 and model.nodes:  # delete, by some caller
                rid, caller = rnd.choice(sorted(model.nodes)), rnd.choice(OWNERS)
                expected = model.visible(rid, now, caller)
                assert store.delete(rid, caller) is expected, (seed, rid)
                if expected:
                    model.nodes[rid]["deleted"] = cleaned = True
            elif op < 0.85:  # time passes (now and then backwards: a clock set back)
                clock[0] += rnd.uniform(-15, 5) if rnd.random() < 0.1 else rnd.uniform(0, 40)
            elif op < 0.95:
                store.purge()
                cleaned = True
            else:  # a restart: the store opened anew from its file (which purges)
                store.close()
                store = _open(path, clock, step)
                cleaned = True
            now = clock[0]
            rows = _physical(path)
            for rid in model.nodes:
                if rid not in rows and rid not in model.gone:
                    # removed from the file: only once nothing living needed it (nor the ones it continued)
                    assert model.keep(rid) <= now, (seed, rid, "removed while needed")
                    model.gone.add(rid)
            assert rows <= set(model.nodes), seed
            for rid, n in model.nodes.items():
                for caller in (None, rnd.choice(OWNERS[1:])):  # everyone's view, and one key's
                    if model.visible(rid, now, caller):
                        assert store.response(rid, caller) == n["response"], (seed, rid)
                        assert store.input_items(rid, caller) == n["input_items"], (seed, rid)
                        assert store.continuation(rid, caller) == n["continuation"], (seed, rid)
                    else:
                        assert store.response(rid, caller) is None, (seed, rid, caller)
                        assert store.continuation(rid, caller) is None, (seed, rid, caller)
                        assert store.input_items(rid, caller) is None, (seed, rid, caller)
            if cleaned:  # after a purge, a reopening or a delete: nothing kept for nothing
                if step == 0:
                    assert rows <= model.needed(now), (seed, sorted(rows - model.needed(now)))
                else:  # kept at most one step past what needs them
                    assert all(model.keep(r) > now for r in rows), (seed, now, {r: model.keep(r) for r in rows})
                    assert rows >= model.needed(now), seed
    finally:
        store.close()


@pytest.mark.parametrize("block", range(8))
def test_the_chain_store_matches_a_model_that_copies_conversations_whole(tmp_path, block):
    for seed in range(block * 15, block * 15 + 15):
        _run(seed, tmp_path)
