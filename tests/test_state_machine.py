"""A hypothesis state machine: random operation sequences on a Table and on a dict must agree,
and the table must pass its full invariant check after every step.

The table is small (capacity 8, 16 index slots) and the keys few, so that sequences often hit
a full table, long probe chains, deletes in the middle of chains, and reused entries. Keys
may carry a deadline; the clock of deadlines is stopped (conftest.Clock, where the real boot
clock stands) and moved by a rule of its own, so the model knows exactly which keys have
expired. A second machine runs the same rules on an evicting table: there, an insert into a
full table must evict exactly one live key other than its own, and say so."""

from __future__ import annotations

import hypothesis.strategies as st
from conftest import Clock, unique_name
from hypothesis import event, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmkv

CAPACITY = 8
KEY_SIZE = 6
VALUE_SIZE = 10
SECOND = 10**9

keys = st.binary(max_size=2).map(lambda b: b"k" + b)  # 1..3 bytes, few distinct
values = st.binary(max_size=VALUE_SIZE)
counters = st.integers(min_value=-(2**40), max_value=2**40)
ttls = st.sampled_from([None, None, 1, 2, 3, 5])  # seconds; None: never expires
steps = st.sampled_from([0, SECOND // 2, SECOND, 2 * SECOND, 3 * SECOND])


class TableMachine(RuleBasedStateMachine):
    ON_FULL = "error"

    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name("shmkv-sm")
        self.table = shmkv.create(self.name, capacity=CAPACITY, key_size=KEY_SIZE,
                                  value_size=VALUE_SIZE, on_full=self.ON_FULL)
        self.clock = Clock()
        self.now = self.clock.ns
        # key -> (value, deadline in ns or None); only live keys (see _live)
        self.model: dict[bytes, tuple[bytes, int | None]] = {}

    def teardown(self) -> None:
        Clock.restart()
        self.table.unlink()
        self.table.close()

    # ------------------------------------------------------------------ the model

    def _live(self) -> dict[bytes, tuple[bytes, int | None]]:
        """Drops the keys whose deadline has passed: they are invisible to every operation."""
        live = {k: (v, d) for k, (v, d) in self.model.items() if d is None or d > self.now}
        if len(live) < len(self.model):
            event("a key expired")
        self.model = live
        return live

    def _values(self) -> dict[bytes, bytes]:
        return {k: v for k, (v, _) in self._live().items()}

    def _deadline(self, ttl: int | None) -> int | None:
        return None if ttl is None else self.now + ttl * SECOND

    def _full_for(self, *new: bytes) -> bool:
        """An insert of these keys must raise TableFull (never, in an evicting table)."""
        fresh = {k for k in new if k not in self._live()}
        if self.ON_FULL == "evict":
            return len(set(new)) > CAPACITY
        return len(self.model) + len(fresh) > CAPACITY

    def _mutate(self, written: set[bytes], action) -> object:
        """Runs action, which stores the keys in written; in an evicting table, finds the
        keys it evicted to make room and drops them from the model. Returns what action
        returned and the number of live keys evicted."""
        before = self.table.stats()["evictions"]
        result = action()
        evicted = self.table.stats()["evictions"] - before
        if self.ON_FULL == "evict":
            present = set(self.table)
            vanished = set(self._live()) - present
            assert not vanished & written, "a write evicted its own key"
            assert len(vanished) == evicted
            for key in vanished:
                del self.model[key]
        else:
            assert evicted == 0
        self.evicted = evicted
        if evicted:
            event("a write evicted a live key")
        return result

    def _store(self, key: bytes, value: bytes, deadline: int | None) -> None:
        self.model[key] = (value, deadline)

    # ------------------------------------------------------------------ rules

    @rule(key=keys, value=values, ttl=ttls, keep=st.booleans())
    def set(self, key: bytes, value: bytes, ttl: int | None, keep: bool) -> None:
        keep = keep and ttl is None
        if self._full_for(key):
            try:
                self.table.set(key, value, ttl)
            except shmkv.TableFull:
                event("a full table refused a key")
                return
            raise AssertionError("a full table took a new key")
        old = self._live().get(key)
        evicted = self._mutate({key}, lambda: self.table.set(key, value, ttl, keep_ttl=keep))
        assert evicted == (self.evicted > 0)
        self._store(key, value, old[1] if keep and old else self._deadline(ttl))

    @rule(key=keys, value=values, ttl=ttls)
    def add(self, key: bytes, value: bytes, ttl: int | None) -> None:
        if self._full_for(key):
            try:
                self.table.add(key, value, ttl)
            except shmkv.TableFull:
                return
            raise AssertionError("a full table took a new key")
        absent = key not in self._live()
        assert self._mutate({key}, lambda: self.table.add(key, value, ttl)) == absent
        if absent:
            self._store(key, value, self._deadline(ttl))

    @rule(key=keys)
    def delete(self, key: bytes) -> None:
        old = self._live().pop(key, None)
        assert self.table.pop(key, None) == (old[0] if old else None)

    @rule(key=keys)
    def get(self, key: bytes) -> None:
        assert self.table.get(key) == self._values().get(key)
        assert (key in self.table) == (key in self.model)

    @rule(key=keys, delta=counters, ttl=ttls)
    def incr(self, key: bytes, delta: int, ttl: int | None) -> None:
        current = self._live().get(key)
        if current is None:
            if self._full_for(key):
                return
            new, deadline = delta, self._deadline(ttl)
        elif len(current[0]) != 8:
            try:
                self.table.incr(key, delta, ttl=ttl)
            except shmkv.NotACounter:
                return
            raise AssertionError("incr accepted a value that is not a counter")
        else:
            new, deadline = int.from_bytes(current[0], "little", signed=True) + delta, current[1]
        assert self._mutate({key}, lambda: self.table.incr(key, delta, ttl=ttl)) == new
        self._store(key, new.to_bytes(8, "little", signed=True), deadline)

    @rule(key=keys, new=values, use_current=st.booleans(), ttl=ttls, keep=st.booleans())
    def compare_and_swap(self, key: bytes, new: bytes, use_current: bool, ttl: int | None,
                         keep: bool) -> None:
        keep = keep and ttl is None
        current = self._live().get(key)
        expected = current[0] if use_current and current is not None else b"\xffnever"
        swapped = self.table.compare_and_swap(key, expected, new, ttl, keep_ttl=keep)
        assert swapped == (current is not None and expected == current[0])
        if swapped:
            self._store(key, new, current[1] if keep else self._deadline(ttl))

    @rule(key=keys, value=values)
    def setdefault(self, key: bytes, value: bytes) -> None:
        if self._full_for(key):
            return
        old = self._live().get(key)
        got = self._mutate({key}, lambda: self.table.setdefault(key, value))
        assert got == (old[0] if old else value)
        if old is None:
            self._store(key, value, None)

    @rule(batch=st.dictionaries(keys, values, max_size=4), ttl=ttls)
    def set_many(self, batch: dict[bytes, bytes], ttl: int | None) -> None:
        if self._full_for(*batch):
            before = dict(self.table)
            try:
                self.table.set_many(batch, ttl)
            except shmkv.TableFull:
                assert dict(self.table) == before
                return
            raise AssertionError("set_many overfilled the table")
        self._mutate(set(batch), lambda: self.table.set_many(batch, ttl))
        for key, value in batch.items():
            self._store(key, value, self._deadline(ttl))

    @rule(batch=st.lists(keys, max_size=5))
    def get_many(self, batch: list[bytes]) -> None:
        live = self._values()
        assert self.table.get_many(batch) == {k: live[k] for k in batch if k in live}

    @precondition(lambda self: len(self._live()) > 0)
    @rule()
    def popitem(self) -> None:
        key, value = self.table.popitem()
        assert self.model.pop(key)[0] == value

    @rule()
    def clear(self) -> None:
        self.table.clear()
        self.model.clear()

    @rule(step=steps)
    def advance_clock(self, step: int) -> None:
        self.clock.advance(step / SECOND)
        self.now = self.clock.ns

    @rule(key=keys, ttl=st.sampled_from([1, 2, 3, 5]), touch=st.booleans())
    def touch_or_expire(self, key: bytes, ttl: int, touch: bool) -> None:
        present = key in self._live()
        assert (self.table.touch if touch else self.table.expire)(key, ttl) == present
        if present:
            self._store(key, self.model[key][0], self._deadline(ttl))

    @rule(key=keys)
    def persist(self, key: bytes) -> None:
        present = key in self._live()
        assert self.table.expire(key, None) == present
        if present:
            self._store(key, self.model[key][0], None)

    @rule(key=keys)
    def ttl(self, key: bytes) -> None:
        entry = self._live().get(key)
        if entry is None:
            try:
                self.table.ttl(key)
            except KeyError:
                return
            raise AssertionError("ttl() of an absent key")
        deadline = entry[1]
        assert self.table.ttl(key) == (None if deadline is None
                                       else (deadline - self.now) / SECOND)

    @rule()
    def purge_expired(self) -> None:
        assert self.table.purge_expired() >= 0
        assert self.table.stats()["len"] == len(self._live())

    @rule()
    def reattach(self) -> None:
        """A second handle (as another process would have) sees the same table."""
        other = shmkv.attach(self.name)
        try:
            assert dict(other.items()) == self._values()
        finally:
            other.close()

    @invariant()
    def agrees_with_dict_and_checks(self) -> None:
        self.table.check()
        assert len(self.table) == len(self._live())
        assert dict(self.table.items()) == self._values()


class EvictingTableMachine(TableMachine):
    ON_FULL = "evict"


for machine in (TableMachine, EvictingTableMachine):
    machine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                         deadline=None)
test_table_state_machine = TableMachine.TestCase
test_evicting_table_state_machine = EvictingTableMachine.TestCase
