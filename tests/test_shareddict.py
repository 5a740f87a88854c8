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
    with pytest.raises(TypeError):
        shared.incr("k")


def test_keys_must_be_str(shared: shmkv.SharedDict) -> None:
    with pytest.raises(TypeError):
        shared[b"bytes"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        shared[1] = 1  # type: ignore[index]


def test_oversize_encoded_value_names_the_limit(shared: shmkv.SharedDict) -> None:
    with pytest.raises(shmkv.ValueTooLarge) as info:
        shared["big"] = "x" * 1000
    assert "value_size=256" in str(info.value)
    assert "big" not in shared


def test_unicode_keys_round_trip(shared: shmkv.SharedDict) -> None:
    shared["clé-ключ-鍵"] = "ok"
    assert list(shared) == ["clé-ключ-鍵"]


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
