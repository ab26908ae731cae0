"""The Flink job server JVM for one pipeline run, started by beamzoo.

Beam's FlinkRunner can start the job server itself, but it starts it only
when the pipeline is submitted and waits for it through gRPC's reconnect
back-off. beamzoo starts it first, so that the JVM boots while the pipeline
is being built, polls its port, and hands Beam ``--job_endpoint``.

A job server lives for one run, so it gets JVM settings for a short-lived
process: the C1 compiler only, the serial collector, and a class-data
sharing archive (made by the first run, kept in the Flink cache) so that
the job server and Flink's MiniCluster load their classes from a memory map.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from beamzoo.runners.flink_fetch import cache_dir

log = logging.getLogger(__name__)

JVM_OPTIONS = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child, before exec
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def class_archive(jar: str, java: str = "java") -> Path:
    """Where the class-data sharing archive for this jar and this JVM lives."""
    java_path = os.path.realpath(shutil.which(java) or java)
    ids = [(p, os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (jar, java_path) if os.path.exists(p)]
    key = hashlib.sha256(repr(ids).encode()).hexdigest()[:16]
    return cache_dir() / f"job-server-{key}.jsa"


class JobServer:
    """``java -jar <jar>`` for one run; ``endpoint`` is ready after ``wait()``.

    ``master``: the job server's ``--flink-master`` (``[local]`` runs an
    embedded Flink). ``jvm_options``: None for beamzoo's (see above).
    """

    def __init__(self, jar: str, master: str, jvm_options: list[str] | None = None,
                 java: str = "java", timeout: float = 120):
        self.jar, self.master, self.java, self.timeout = jar, master, java, timeout
        self.jvm_options = list(JVM_OPTIONS if jvm_options is None else jvm_options)
        self.port = _free_port()
        self.endpoint = f"localhost:{self.port}"
        self._proc: subprocess.Popen | None = None
        self._dir = self._dump = self._archive = None

    def start(self) -> "JobServer":
        self._dir = tempfile.mkdtemp(prefix="beamzoo-job-server-")
        self._launch(self._archive_options())
        return self

    def _archive_options(self) -> list[str]:
        """Use the class-data archive, or write it at exit when there is none
        (only with beamzoo's own JVM options: the archive depends on them)."""
        if self.jvm_options != list(JVM_OPTIONS):
            return []
        archive = class_archive(self.jar, self.java)
        if archive.exists():
            self._archive = archive
            return [f"-XX:SharedArchiveFile={archive}"]
        self._dump = (Path(f"{archive}.{os.getpid()}.tmp"), archive)
        return [f"-XX:ArchiveClassesAtExit={self._dump[0]}"]

    def _launch(self, archive_options: list[str]) -> None:
        # a JVM crash report goes to the run's folder, not the user's working directory
        options = [*self.jvm_options, *archive_options, f"-XX:ErrorFile={self._dir}/hs_err_%p.log"]
        log.debug("job server JVM options: %s", options)
        cmd = [self.java, *options, "-jar", self.jar, "--flink-master", self.master,
               "--artifacts-dir", os.path.join(self._dir, "artifacts"), "--job-port", str(self.port),
               "--artifact-port", "0", "--expansion-port", "0"]
        with open(self.log_path, "wb") as out:
            self._proc = subprocess.Popen(
                cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None)

    @property
    def log_path(self) -> str:
        return os.path.join(self._dir, "job-server.log")

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError), open(self.log_path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
        return ""

    def wait(self) -> str:
        """Block until the job server accepts connections; returns the endpoint."""
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                socket.create_connection(("localhost", self.port), timeout=1).close()
                return self.endpoint
            except OSError:
                pass
            if self._proc.poll() is not None and self._archive is not None:
                log.warning("The Flink job server did not start with the class-data archive %s; "
                            "removing it and starting without it.", self._archive)
                self._archive.unlink(missing_ok=True)
                self._archive = None
                self._launch([])
                continue
            if self._proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with code {self._proc.returncode}" if self._proc.poll() is not None
                       else f"did not listen on port {self.port} within {self.timeout:.0f} s")
                raise RuntimeError(f"The Flink job server ({self.jar}) {why}. Its log ends with:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.02)

    def stop(self, failed: bool = False) -> None:
        if self._proc is None:
            return
        if failed:
            log.error("Flink job server log (last lines):\n%s", self.log_tail())
        if self._proc.poll() is None:
            self._proc.terminate()
        try:
            self._proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._dump:
            tmp, archive = self._dump
            if self._proc.returncode >= 0 and tmp.exists() and self._archive_works(tmp):
                os.replace(tmp, archive)  # written whole, and a JVM can map it
            tmp.unlink(missing_ok=True)
        shutil.rmtree(self._dir, ignore_errors=True)
        self._proc = None

    def _archive_works(self, archive: Path) -> bool:
        check = [self.java, *self.jvm_options, f"-XX:SharedArchiveFile={archive}", "-Xshare:on",
                 f"-XX:ErrorFile={self._dir}/hs_err_%p.log", "-cp", self.jar, "-version"]
        return subprocess.run(check, capture_output=True, cwd=self._dir).returncode == 0

    def __enter__(self) -> "JobServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb):
        self.stop(failed=exc_type is not None)
        return False
