"""The README's snippets for Flask-Caching, shmkv.memoize and Prometheus, run as written
(only the table's name is made unique, and the textfile directory a temporary one)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import JOIN_TIMEOUT

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def snippet(first_line: str, language: str = "python") -> str:
    """The README's code block that starts with first_line."""
    found = re.findall(rf"```{language}\n({re.escape(first_line)}\n.*?)```", README, re.S)
    assert len(found) == 1, f"the README has no single block starting {first_line!r}"
    return found[0]


def test_flask_caching_snippet(make_name) -> None:
    pytest.importorskip("flask_caching", reason="Flask-Caching is in the test extra")
    name = make_name()
    code = snippet("# cache_app.py").replace("shm://cache?", f"shm://{name}?")
    namespace: dict[str, object] = {"__name__": "cache_app"}
    exec(compile(code, "README.md:cache_app.py", "exec"), namespace)
    client = namespace["app"].test_client()  # type: ignore[attr-defined]
    first = client.get("/report/10")
    assert first.json == {"year": 10, "total": 45}
    assert client.get("/report/10").data == first.data
    table = namespace["cache"].cache.table  # type: ignore[attr-defined]
    assert any(key.startswith(b"flask_cache_") for key in table)
    assert 55 < table.ttl(next(iter(table))) <= 60


def test_memoize_snippet(make_name, tmp_path: Path) -> None:
    name = make_name()
    script = tmp_path / "memo.py"
    script.write_text(snippet("# memo.py").replace("shm://memo?", f"shm://{name}?"))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=JOIN_TIMEOUT, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout == f"{[23416728348467685] * 8}\n"


def test_metrics_handler_snippet(table) -> None:
    flask = pytest.importorskip("flask", reason="Flask is in the test extra")
    parser = pytest.importorskip("prometheus_client.parser",
                                 reason="prometheus_client is in the test extra")
    namespace: dict[str, object] = {"app": flask.Flask("metrics")}
    exec(compile(snippet("# metrics.py: a route of the app, for Prometheus to scrape"),
                 "README.md:metrics.py", "exec"), namespace)
    response = namespace["app"].test_client().get("/metrics")  # type: ignore[attr-defined]
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    names = {s.labels.get("table") for f in parser.text_string_to_metric_families(response.text)
             for s in f.samples}
    assert table.name in names


def test_textfile_cron_line(table, tmp_path: Path) -> None:
    parser = pytest.importorskip("prometheus_client.parser",
                                 reason="prometheus_client is in the test extra")
    block = snippet("# /etc/cron.d/shmkv: node_exporter "
                    "--collector.textfile.directory=/var/lib/node_exporter", "sh")
    line = next(line for line in block.splitlines() if line.startswith("* * * * * "))
    command = line.split(None, 6)[6].replace("/var/lib/node_exporter", str(tmp_path))
    bin_dir = os.path.dirname(sys.executable)  # where pip put shmkv-inspect
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    subprocess.run(["sh", "-c", command], check=True, env=env, timeout=JOIN_TIMEOUT)
    assert sorted(os.listdir(tmp_path)) == ["shmkv.prom"]  # the .tmp was renamed over it
    text = (tmp_path / "shmkv.prom").read_text()
    assert table.name in {s.labels.get("table")
                          for f in parser.text_string_to_metric_families(text)
                          for s in f.samples}
