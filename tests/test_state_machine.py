"""A hypothesis state machine: random operation sequences on a Table and on a dict must agree,
and the table must pass its full invariant check after every step.

The table is small (capacity 8, 16 index slots) and the keys few, so that sequences often hit
a full table, long probe chains, deletes in the middle of chains, and reused entries."""

from __future__ import annotations

import hypothesis.strategies as st
from conftest import remove, unique_name
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import shmkv

CAPACITY = 8
KEY_SIZE = 6
VALUE_SIZE = 10

keys = st.binary(max_size=2).map(lambda b: b"k" + b)  # 1..3 bytes, few distinct
values = st.binary(max_size=VALUE_SIZE)
counters = st.integers(min_value=-(2**40), max_value=2**40)


class TableMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.name = unique_name("shmkv-sm")
        self.table = shmkv.create(self.name, capacity=CAPACITY, key_size=KEY_SIZE,
                                  value_size=VALUE_SIZE)
        self.model: dict[bytes, bytes] = {}

    def teardown(self) -> None:
        self.table.close()
        remove(self.name)

    def _full_for(self, key: bytes) -> bool:
        return key not in self.model and len(self.model) >= CAPACITY

    @rule(key=keys, value=values)
    def set(self, key: bytes, value: bytes) -> None:
        if self._full_for(key):
            try:
                self.table[key] = value
            except shmkv.TableFull:
                return
            raise AssertionError("a full table took a new key")
        self.table[key] = value
        self.model[key] = value

    @rule(key=keys, value=values)
    def add(self, key: bytes, value: bytes) -> None:
        if self._full_for(key):
            try:
                self.table.add(key, value)
            except shmkv.TableFull:
                return
            raise AssertionError("a full table took a new key")
        assert self.table.add(key, value) == (key not in self.model)
        self.model.setdefault(key, value)

    @rule(key=keys)
    def delete(self, key: bytes) -> None:
        assert self.table.pop(key, None) == self.model.pop(key, None)

    @rule(key=keys)
    def get(self, key: bytes) -> None:
        assert self.table.get(key) == self.model.get(key)
        assert (key in self.table) == (key in self.model)

    @rule(key=keys, delta=counters)
    def incr(self, key: bytes, delta: int) -> None:
        current = self.model.get(key)
        if current is None:
            if len(self.model) >= CAPACITY:
                return
            new = delta
        elif len(current) != 8:
            try:
                self.table.incr(key, delta)
            except shmkv.NotACounter:
                return
            raise AssertionError("incr accepted a value that is not a counter")
        else:
            new = int.from_bytes(current, "little", signed=True) + delta
        assert self.table.incr(key, delta) == new
        self.model[key] = new.to_bytes(8, "little", signed=True)

    @rule(key=keys, new=values, use_current=st.booleans())
    def compare_and_swap(self, key: bytes, new: bytes, use_current: bool) -> None:
        current = self.model.get(key)
        expected = current if use_current and current is not None else b"\xffnever"
        swapped = self.table.compare_and_swap(key, expected, new)
        assert swapped == (current is not None and expected == current)
        if swapped:
            self.model[key] = new

    @rule(key=keys, value=values)
    def setdefault(self, key: bytes, value: bytes) -> None:
        if self._full_for(key):
            return
        assert self.table.setdefault(key, value) == self.model.setdefault(key, value)

    @rule(batch=st.dictionaries(keys, values, max_size=4))
    def set_many(self, batch: dict[bytes, bytes]) -> None:
        fresh = [k for k in batch if k not in self.model]
        if len(self.model) + len(fresh) > CAPACITY:
            before = dict(self.table)
            try:
                self.table.set_many(batch)
            except shmkv.TableFull:
                assert dict(self.table) == before
                return
            raise AssertionError("set_many overfilled the table")
        self.table.set_many(batch)
        self.model.update(batch)

    @rule(batch=st.lists(keys, max_size=5))
    def get_many(self, batch: list[bytes]) -> None:
        assert self.table.get_many(batch) == {k: self.model[k] for k in batch if k in self.model}

    @precondition(lambda self: len(self.model) > 0)
    @rule()
    def popitem(self) -> None:
        key, value = self.table.popitem()
        assert self.model.pop(key) == value

    @rule()
    def clear(self) -> None:
        self.table.clear()
        self.model.clear()

    @rule()
    def reattach(self) -> None:
        """A second handle (as another process would have) sees the same table."""
        other = shmkv.attach(self.name)
        try:
            assert dict(other.items()) == self.model
        finally:
            other.close()

    @invariant()
    def agrees_with_dict_and_checks(self) -> None:
        self.table.check()
        assert len(self.table) == len(self.model)
        assert dict(self.table.items()) == self.model


TableMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)
test_table_state_machine = TableMachine.TestCase
