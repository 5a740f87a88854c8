"""SharedDict: str keys, values through a codec, dict semantics over a Table."""

from __future__ import annotations

import pickle
from decimal import Decimal

import pytest

import shmkv


@pytest.fixture(params=["pickle", "json"])
def shared(request, make_name):
    t = shmkv.create(make_name(), capacity=64, key_size=32, value_size=256)
    d = shmkv.SharedDict(t, codec=request.param)
    yield d
    t.unlink()
    t.close()


def test_behaves_like_a_dict(shared: shmkv.SharedDict) -> None:
    model: dict = {}
    for d in (shared, model):
        d["user"] = {"name": "ada", "roles": ["admin"]}
        d["n"] = 1
        d["gone"] = None
        del d["gone"]
        d.update({"a": [1, 2]}, b="x")
        d.setdefault("n", 99)
        d.setdefault("new", "default")
    assert dict(shared) == model
    assert shared == model
    assert sorted(shared) == sorted(model)
    assert sorted(shared.items(), key=str) == sorted(model.items(), key=str)
    assert len(shared) == len(model)
    assert "user" in shared and "nope" not in shared and b"user" not in shared
    assert shared.get("nope", 5) == 5
    assert shared.pop("a") == model.pop("a")
    assert shared.pop("a", "dflt") == "dflt"
    with pytest.raises(KeyError):
        shared["nope"]
    with pytest.raises(KeyError):
        del shared["nope"]
    k, v = shared.popitem()
    assert model.pop(k) == v
    shared.clear()
    assert len(shared) == 0


def test_add_incr_cas_and_batches(shared: shmkv.SharedDict) -> None:
    assert shared.add("k", [1]) is True
    assert shared.add("k", [2]) is False
    assert shared.incr("count") == 1
    assert shared.incr("count", 5) == 6
    assert shared.incr("other", 1, initial=10) == 11
    assert shared.compare_and_swap("k", [1], {"v": 2}) is True
    assert shared.compare_and_swap("k", [1], {"v": 3}) is False
    assert shared.compare_and_swap("absent", [1], 0) is False
    assert shared["k"] == {"v": 2}
    shared.set_many({"x": 1, "y": [2]})
    assert shared.get_many(["x", "y", "z"]) == {"x": 1, "y": [2]}
    with pytest.raises(TypeError) as info:
        shared.incr("k")
    assert str(info.value) == (f"table {shared.table.name!r}: the value of 'k' is a dict, "
                               "not an int")


def test_keys_must_be_str(shared: shmkv.SharedDict) -> None:
    with pytest.raises(TypeError) as info:
        shared[b"bytes"] = 1  # type: ignore[index]
    assert str(info.value) == f"table {shared.table.name!r}: SharedDict keys are str, not bytes"
    with pytest.raises(TypeError):
        shared[1] = 1  # type: ignore[index]
    assert b"bytes" not in shared and 1 not in shared and len(shared) == 0


def test_oversize_encoded_value_names_the_limit(shared: shmkv.SharedDict) -> None:
    with pytest.raises(shmkv.ValueTooLarge) as info:
        shared["big"] = "x" * 1000
    assert "value_size=256" in str(info.value)
    assert "big" not in shared


def test_unicode_keys_round_trip(shared: shmkv.SharedDict) -> None:
    shared["clé-ключ-鍵"] = "ok"
    assert list(shared) == ["clé-ключ-鍵"]
    assert "clé-ключ-鍵".encode() in shared.table  # UTF-8, as any language reads it


# 'ÿ' is b"\xc3\xbf" in UTF-8; surrogateescape made the same two bytes of '\udcc3\udcbf'.
LONE_SURROGATES = ["\udcc3\udcbf", "\udcff", "a\ud800b"]


@pytest.mark.parametrize("bad", LONE_SURROGATES)
def test_a_key_without_utf8_form_is_refused_and_changes_nothing(shared: shmkv.SharedDict,
                                                                 bad: str) -> None:
    """One str, one key: a str with lone surrogates is no text, so no key; every operation
    that takes it raises (UnicodeEncodeError, a ValueError) before the table is touched."""
    shared["ÿ"] = "y-diaeresis"
    before = dict(shared.table.items())
    for op in (lambda: shared.__setitem__(bad, "x"), lambda: shared[bad],
               lambda: shared.get(bad), lambda: shared.set(bad, 1, ttl=5),
               lambda: shared.add(bad, 1), lambda: shared.setdefault(bad, 1),
               lambda: shared.pop(bad), lambda: shared.pop(bad, None),
               lambda: shared.__delitem__(bad), lambda: shared.incr(bad),
               lambda: shared.compare_and_swap(bad, "y-diaeresis", 1),
               lambda: shared.touch(bad, 5), lambda: shared.expire(bad, 5),
               lambda: shared.ttl(bad), lambda: shared.update({bad: 1}),
               lambda: shared.set_many({"fine": 1, bad: 2}), lambda: shared.get_many([bad])):
        with pytest.raises(UnicodeEncodeError) as info:
            op()
        assert isinstance(info.value, ValueError)
        message = str(info.value)
        assert "lone surrogate" in message and repr(shared.table.name) in message
    assert bad not in shared
    assert dict(shared.table.items()) == before and shared["ÿ"] == "y-diaeresis"


def test_the_surrogateescape_twin_of_a_key_is_refused(shared: shmkv.SharedDict) -> None:
    shared["ÿ"] = 1
    with pytest.raises(UnicodeEncodeError):
        shared["\udcc3\udcbf"] = 2
    assert shared["ÿ"] == 1 and len(shared) == 1
    assert "\udcc3\udcbf" not in shared


def test_a_key_that_is_not_utf8_is_named_not_aliased(shared: shmkv.SharedDict) -> None:
    """A key written through the bytes Table that is not UTF-8 is no SharedDict key:
    iterating raises, naming it, instead of showing it as some str (surrogateescape showed
    b"\xc3\xbf" and b"\xff" as keys that aliased others); what needs no key name still works."""
    t = shared.table
    shared["text"] = "kept"
    t[b"\xff"] = shared._dumps("foreign")
    for op in (lambda: list(shared), lambda: dict(shared), lambda: list(shared.items()),
               lambda: list(shared.keys()), lambda: shared == {"text": "kept"}):
        with pytest.raises(UnicodeDecodeError) as info:
            op()
        assert repr(t.name) in str(info.value) and "b'\\xff'" in str(info.value)
    assert len(shared) == 2 and "text" in shared and "\udcff" not in shared
    assert sorted(shared.values()) == ["foreign", "kept"]
    assert shared.get_many(["text", "x"]) == {"text": "kept"}
    assert shared.popitem() == ("text", "kept")  # passes over the foreign key
    with pytest.raises(UnicodeDecodeError):  # only it is left: named, not popped
        shared.popitem()
    assert t[b"\xff"] == shared._dumps("foreign")
    shared.clear()
    assert len(shared) == 0 and list(shared) == []
    with pytest.raises(KeyError, match="is empty"):
        shared.popitem()


def test_pickle_codec_takes_any_picklable(make_name) -> None:
    with shmkv.create(make_name(), capacity=4, key_size=16, value_size=256) as t:
        d = shmkv.SharedDict(t)
        d["dec"] = Decimal("1.5")
        d["set"] = {1, 2}
        assert d["dec"] == Decimal("1.5") and d["set"] == {1, 2}
        copy = pickle.loads(pickle.dumps(d))
        assert copy["dec"] == Decimal("1.5")
        copy.close()
        t.unlink()


def test_json_codec_refuses_what_json_cannot_hold(make_name) -> None:
    with shmkv.create(make_name(), capacity=4, key_size=16, value_size=256) as t:
        d = shmkv.SharedDict(t, codec="json")
        with pytest.raises(TypeError):
            d["set"] = {1, 2}
        assert len(d) == 0
        t.unlink()


def test_custom_and_unknown_codecs(make_name) -> None:
    class Upper:
        @staticmethod
        def dumps(obj):
            return obj.upper().encode()

        @staticmethod
        def loads(data):
            return data.decode()

    with shmkv.create(make_name(), capacity=4, key_size=16, value_size=64) as t:
        d = shmkv.SharedDict(t, codec=Upper())
        d["k"] = "shout"
        assert d["k"] == "SHOUT" and t[b"k"] == b"SHOUT"
        with pytest.raises(ValueError):
            shmkv.SharedDict(t, codec="yaml")
        with pytest.raises(TypeError):
            shmkv.SharedDict(t, codec=object())  # type: ignore[arg-type]
        with pytest.raises(TypeError):
            shmkv.SharedDict({})  # type: ignore[arg-type]
        t.unlink()


def test_str_and_bytes_codecs(make_name) -> None:
    with shmkv.create(make_name(), capacity=4, key_size=16, value_size=64) as t:
        text = shmkv.SharedDict(t, codec="str")
        text["greeting"] = "héllo"
        assert t[b"greeting"] == "héllo".encode() and text["greeting"] == "héllo"
        with pytest.raises(TypeError, match="str codec"):
            text["n"] = 1
        with pytest.raises(UnicodeEncodeError):  # not valid text: refused, not mangled
            text["bad"] = "\udcff"
        assert text.setdefault("greeting") == "héllo"  # the default is not even encoded
        raw = shmkv.SharedDict(t, codec="bytes")
        raw["blob"] = b"\x00\xff"
        raw["view"] = memoryview(bytearray(b"abc"))
        assert raw["blob"] == t[b"blob"] == b"\x00\xff" and raw["view"] == b"abc"
        with pytest.raises(TypeError, match="bytes codec"):
            raw["s"] = "text"
        assert sorted(t) == [b"blob", b"greeting", b"view"]
        t.unlink()


def test_ttl_methods(make_name, clock) -> None:
    with shmkv.create(make_name(), capacity=8, key_size=16, value_size=64) as t:
        d = shmkv.SharedDict(t, codec="json")
        d.set("session", {"user": "ada"}, ttl=30)
        assert d.ttl("session") == 30.0
        clock.advance(20)
        assert d.touch("session", 30) is True and d.ttl("session") == 30.0
        assert d.add("session", {}, ttl=5) is False
        assert d.compare_and_swap("session", {"user": "ada"}, {"user": "bob"}, keep_ttl=True)
        assert d.ttl("session") == 30.0
        assert d.incr("hits", ttl=10) == 1 and d.incr("hits", ttl=99) == 2
        assert d.ttl("hits") == 10.0  # a counter's ttl is set when it is created
        assert d.expire("hits", None) is True and d.ttl("hits") is None
        d.set_many({"a": 1, "b": 2}, ttl=1)
        clock.advance(1)
        assert d.get_many(["a", "b", "session"]) == {"session": {"user": "bob"}}
        assert d.purge_expired() == 2
        clock.advance(30)
        assert "session" not in d and d.touch("session", 30) is False
        with pytest.raises(KeyError, match="session"):
            d.ttl("session")
        assert dict(d) == {"hits": 2}
        # Bad arguments fail whatever the table holds, not only when they would be used.
        with pytest.raises(ValueError):
            d.incr("hits", ttl=-5)
        with pytest.raises(ValueError):
            d.compare_and_swap("hits", "not the value", 3, ttl=0)
        with pytest.raises(ValueError, match="either ttl or keep_ttl"):
            d.compare_and_swap("hits", 2, 3, ttl=1, keep_ttl=True)
        assert d["hits"] == 2
        t.unlink()
