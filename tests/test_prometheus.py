"""shmkv-inspect --prometheus: the output parses with prometheus_client's own parser, holds
each table's counters and memory, and escapes label values as the format asks."""

from __future__ import annotations

import pytest

import shmkv
from shmkv import cli
from shmkv.cli import main

parser = pytest.importorskip("prometheus_client.parser",
                             reason="prometheus_client is in the test extra")


def families(text: str) -> dict[str, object]:
    return {f.name: f for f in parser.text_string_to_metric_families(text)}


def ours(family, name: str) -> dict[str, float]:
    return {s.name: s.value for s in family.samples if s.labels.get("table") == name}


def test_every_table_in_the_text_format(table: shmkv.Table, capsys) -> None:
    table[b"a"] = b"1"
    table[b"b"] = b"22"
    table.get(b"a")
    table.get(b"nope")
    table.get(b"a")
    stats = table.stats()  # which also adds this handle's hits and misses to the table's
    assert main(["--prometheus"]) == 0
    out = capsys.readouterr().out
    found = families(out)
    name = table.name
    # Counters lose their _total in the family's name, as the parser reads them.
    assert found["shmkv_hits"].type == "counter"
    assert ours(found["shmkv_hits"], name) == {"shmkv_hits_total": stats["hits"]} \
        == {"shmkv_hits_total": 2}
    assert ours(found["shmkv_misses"], name) == {"shmkv_misses_total": 1}
    assert ours(found["shmkv_inserts"], name) == {"shmkv_inserts_total": 2}
    assert found["shmkv_keys"].type == "gauge"
    assert ours(found["shmkv_keys"], name) == {"shmkv_keys": 2}
    assert ours(found["shmkv_capacity_keys"], name) == {"shmkv_capacity_keys": 64}
    for metric in ("used_bytes", "free_bytes", "stored_bytes", "segment_bytes"):
        key = {"used_bytes": "bytes_used", "free_bytes": "bytes_free",
               "stored_bytes": "bytes_stored", "segment_bytes": "segment_size"}[metric]
        assert ours(found[f"shmkv_{metric}"], name) == {f"shmkv_{metric}": stats[key]}
    info = [s for s in found["shmkv_table_info"].samples if s.labels["table"] == name]
    assert len(info) == 1 and info[0].labels["on_full"] == "error"
    # Every family has its HELP and TYPE lines, once.
    for metric, _ in [(m, k) for _, m, k in cli.PROMETHEUS_COUNTERS + cli.PROMETHEUS_GAUGES]:
        assert out.count(f"# TYPE {metric} ") == 1 and out.count(f"# HELP {metric} ") == 1


def test_one_table_by_name(table: shmkv.Table, capsys) -> None:
    assert main([table.name, "--prometheus"]) == 0
    found = families(capsys.readouterr().out)
    assert {s.labels["table"] for s in found["shmkv_keys"].samples} == {table.name}
    assert main(["shmkv-test-no-such-table", "--prometheus"]) == cli.EXIT_NO_TABLE
    assert main(["--prometheus", "--json"]) == cli.EXIT_USAGE


def test_label_values_are_escaped(table: shmkv.Table) -> None:
    d = cli.summary(table)
    weird = 'a "quoted"\\back\nslash'
    text = cli.format_prometheus([{**d, "name": weird, "owner": "x\\\"y"}])
    assert '\\"quoted\\"\\\\back\\nslash' in text
    found = families(text)
    assert [s.labels for s in found["shmkv_keys"].samples] == [{"table": weird}]
    assert found["shmkv_table_info"].samples[0].labels["owner"] == "x\\\"y"
