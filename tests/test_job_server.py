"""The Flink job server JVM that beamzoo starts for a FlinkRunner run."""
from __future__ import annotations

import logging
import shutil

import pytest

from beamzoo.runners import flink, job_server
from beamzoo.runners.options import flink_job_server
from beamzoo.runners.job_server import JVM_OPTIONS, JobServer, class_archive

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
