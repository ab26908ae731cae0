"""The Flink job server JVM that beamzoo starts for a FlinkRunner run."""
from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
import sys

import pytest

from beamzoo.runners import flink, flink_fetch, job_server
from beamzoo.runners.options import flink_job_server
from beamzoo.runners.job_server import JVM_OPTIONS, JobServer, class_archive
from conftest import ROOT, error_line

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs a Java runtime (17)")


@needs_java
def test_a_job_server_that_cannot_start_says_why(tmp_path):
    server = JobServer(str(tmp_path / "missing.jar"), "[local]", timeout=30)
    with pytest.raises(RuntimeError, match=r"(?s)exited with code 1.*missing\.jar"):
        with server:
            server.wait()
    assert server._proc is None  # stopped and reaped


def test_users_own_job_server_or_uber_jar_is_left_alone():
    base = ["--runner=FlinkRunner", "--flink_master=[local]", "--flink_job_server_jar=/x.jar"]
    assert flink_job_server([*base, "--job_endpoint=localhost:8099"]) is None
    assert flink_job_server([*base, "--flink_submit_uber_jar"]) is None


def test_job_server_options_come_from_the_pipeline_options():
    server = flink_job_server(["--runner=FlinkRunner", "--flink_master=localhost:8081",
                               "--flink_job_server_jar=/x.jar", "--job_server_jvm_properties=-Xmx1g"])
    assert (server.jar, server.master, server.jvm_options) == ("/x.jar", "http://localhost:8081", ["-Xmx1g"])
    default = flink_job_server(["--runner=FlinkRunner", "--flink_job_server_jar=/x.jar"])
    assert default.master == "[auto]" and default.jvm_options == list(JVM_OPTIONS)


@needs_java
def test_class_archive_is_per_jar_and_jvm(tmp_path):
    a, b = tmp_path / "a.jar", tmp_path / "b.jar"
    a.write_bytes(b"a")
    b.write_bytes(b"bb")
    assert class_archive(str(a)) != class_archive(str(b))
    assert class_archive(str(a)) == class_archive(str(a))
    assert class_archive(str(a), java="java") != class_archive(str(a), java=str(tmp_path / "other-java"))


@needs_java
@pytest.mark.flink
@pytest.mark.slow
def test_class_archive_is_written_once_and_a_broken_one_is_dropped(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(job_server, "cache_dir", lambda: tmp_path)
    jar = str(flink.job_server_jar())
    archive = class_archive(jar)
    with JobServer(jar, "[local]") as server:  # no archive yet: this JVM writes one at exit
        server.wait()
    assert archive.stat().st_size > 1 << 20
    assert not list(tmp_path.glob("*.tmp"))

    archive.write_bytes(archive.read_bytes()[: 1 << 20])  # cut short: a JVM that maps it crashes
    with caplog.at_level(logging.WARNING), JobServer(jar, "[local]") as server:
        server.wait()  # started again without the archive
    assert "did not start with the class-data archive" in caplog.text
    assert not archive.exists()


# ---------------------------------------------------------------- a first run's fetches

def test_a_first_flink_run_without_java_or_maven_is_one_error_line(tmp_path, colour_dir):
    from test_cards_confined import write_card
    cache = tmp_path / "cache"
    cache.mkdir()
    env = {**os.environ, "BEAMZOO_CACHE": str(cache), "PATH": os.path.dirname(sys.executable)}
    cmd = [sys.executable, os.path.join(ROOT, "pipelines", "score_images.py"), "--runner=FlinkRunner",
           "--no_progress", "--model", write_card(tmp_path / "card"), "--input", str(colour_dir / "*"),
           "--output", str(tmp_path / "out")]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    line = error_line(r.stderr)
    assert "needs 'java' and 'mvn', not found on PATH" in line
    assert "apt-get install openjdk-17-jre-headless maven" in line
    (named,) = re.findall(r"\((/[^)]*\.jar)\)", line)
    assert named.startswith(str(cache / "flink") + os.sep)
    assert list(cache.rglob("*")) == []  # nothing built, nothing left


def test_the_fetches_name_paths_under_beamzoo_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BEAMZOO_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError) as missing:
        flink_fetch.job_server_jar(fetch=False)
    with pytest.raises(RuntimeError) as no_flink:
        flink_fetch.flink_home(fetch=False)
    for exc in (missing.value, no_flink.value):
        paths = [p for p in re.findall(r"(/\S+?)[)`\s]", str(exc)) if p != sys.executable]
        assert paths and all(p.startswith(str(tmp_path)) for p in paths), str(exc)
    assert flink.run_dir().is_relative_to(tmp_path)
    assert job_server.class_archive(str(tmp_path / "x.jar")).parent == tmp_path / "flink"


def test_a_long_step_says_what_it_does_and_when_it_is_done(tmp_path, capsys):
    path = tmp_path / "flink" / "x.jar"
    with flink_fetch.announced("building the Flink job server with Maven", "2 minutes", path):
        pass
    first, done = capsys.readouterr().err.splitlines()
    assert first == f"building the Flink job server with Maven (first run only, about 2 minutes) -> {path}"
    assert re.fullmatch(rf"done in \d+ s: {re.escape(str(path))}", done)
    with pytest.raises(RuntimeError), flink_fetch.announced("fetching x", "1 minute", path):
        raise RuntimeError("pip failed")
    assert "done" not in capsys.readouterr().err  # a step that failed is not done


def test_a_missing_tool_is_named_with_what_to_install(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(flink_fetch.MissingTool, match=r"^x needs 'mvn', not found on PATH: install it "
                                                      r"\(e\.g\. apt-get install maven\)$"):
        flink_fetch.need(("mvn",), "x")
