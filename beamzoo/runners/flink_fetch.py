"""Fetching what FlinkRunner needs: Beam's Flink job server jar and a Flink distribution.

Both are cached under ``$BEAMZOO_CACHE/flink`` (default ``~/.cache/beamzoo/flink``).

* The job server jar. Maven Central, as reached from here, serves no
  ``beam-runners-flink-*-job-server`` jar and no ``beam-runners-flink-2.x``
  runner, so the jar is assembled with Maven (shade plugin) from the newest
  runner library whose whole dependency tree is served,
  ``org.apache.beam:beam-runners-flink-1.19:2.62.0`` (Flink 1.19 client). The
  Beam 2.77 Python SDK talks to it over the portable job and Fn APIs.
* A Flink 1.19 distribution, from the PyPI packages ``apache-flink-libraries``
  (lib/, opt/, plugins/) and ``apache-flink`` (bin/, conf/), installed with
  ``pip install --no-deps --target`` so that nothing lands in the virtual
  environment (apache-flink pins an old apache-beam).

Each fetch says on stderr what it does, how long it takes, where it puts it,
that it goes on (every 30 s) and when it is done; a program it needs that is
not on PATH (``MissingTool``) is named, with what to install.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from beamzoo.zoo import cache_dir as zoo_cache_dir

FLINK_VERSION = "1.19"  # Beam's --flink_version (the runner's Flink minor)
FLINK_DIST_VERSION = "1.19.3"  # the cluster: apache-flink(-libraries) on PyPI
JOB_SERVER_BEAM_VERSION = "2.62.0"  # beam-runners-flink-1.19 release it is built from
JOB_SERVER_MAIN = "org.apache.beam.runners.flink.FlinkJobServerDriver"

_JOB_SERVER_POM = """<?xml version="1.0" encoding="UTF-8"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>beamzoo.local</groupId>
  <artifactId>beam-runners-flink-{flink}-job-server</artifactId>
  <version>{beam}</version>
  <dependencies>
    <dependency><groupId>org.apache.beam</groupId>
      <artifactId>beam-runners-flink-{flink}</artifactId><version>{beam}</version></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>slf4j-simple</artifactId>
      <version>1.7.30</version><scope>runtime</scope></dependency>
    <dependency><groupId>org.slf4j</groupId><artifactId>jcl-over-slf4j</artifactId>
      <version>1.7.30</version><scope>runtime</scope></dependency>
  </dependencies>
  <build><plugins><plugin>
    <groupId>org.apache.maven.plugins</groupId>
    <artifactId>maven-shade-plugin</artifactId><version>3.5.1</version>
    <executions><execution><phase>package</phase><goals><goal>shade</goal></goals>
      <configuration>
        <filters><filter><artifact>*:*</artifact><excludes>
          <exclude>META-INF/*.SF</exclude><exclude>META-INF/*.DSA</exclude>
          <exclude>META-INF/*.RSA</exclude>
        </excludes></filter></filters>
        <transformers>
          <transformer implementation="org.apache.maven.plugins.shade.resource.ServicesResourceTransformer"/>
          <transformer implementation="org.apache.maven.plugins.shade.resource.AppendingTransformer">
            <resource>reference.conf</resource></transformer>
          <transformer implementation="org.apache.maven.plugins.shade.resource.ManifestResourceTransformer">
            <mainClass>{main}</mainClass></transformer>
        </transformers>
      </configuration>
    </execution></executions>
  </plugin></plugins></build>
</project>
"""


# ---------------------------------------------------------------- locations


def beam_version() -> str:
    from apache_beam.version import __version__

    return __version__


def cache_dir() -> Path:
    return zoo_cache_dir() / "flink"


def beam_cached_jar_path() -> Path:
    """Where Beam's JavaJarServer looks for the job server of FLINK_VERSION
    before downloading it (~/.apache_beam/cache/jars/<basename of maven url>)."""
    from apache_beam.utils.subprocess_server import JavaJarServer

    url = JavaJarServer.path_to_beam_jar(f":runners:flink:{FLINK_VERSION}:job-server:shadowJar")
    return Path(JavaJarServer.JAR_CACHE) / os.path.basename(url)


# ---------------------------------------------------------------- fetching


class MissingTool(RuntimeError):
    """A program a fetch needs is not on PATH: the user's to install."""


INSTALL = {"java": "openjdk-17-jre-headless", "mvn": "maven"}  # the Debian/Ubuntu package of each


def need(tools: tuple[str, ...], why: str) -> None:
    """Raise ``MissingTool`` naming those of ``tools`` not on PATH and what to install."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        names = " and ".join(f"{t!r}" for t in missing)
        raise MissingTool(f"{why} needs {names}, not found on PATH: install "
                          f"{'them' if len(missing) > 1 else 'it'} (e.g. apt-get install "
                          f"{' '.join(INSTALL[t] for t in missing)})")


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


@contextlib.contextmanager
def announced(what: str, expected: str, path: Path, every: float = 30.0):
    """Say ``what`` is done and ``expected`` how long it takes (first run only), a line
    every ``every`` seconds while it goes on, and when it is done, with the time it took."""
    say(f"{what} (first run only, about {expected}) -> {path}")
    start, stop = time.monotonic(), threading.Event()

    def tick():
        while not stop.wait(every):
            say(f"  ... still {what.split(' ', 1)[0]} ({time.monotonic() - start:.0f} s)")

    ticker = threading.Thread(target=tick, name="beamzoo-fetch-ticker", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        stop.set()
        ticker.join()
    say(f"done in {time.monotonic() - start:.0f} s: {path}")


def job_server_jar(fetch: bool = True) -> Path:
    """The Flink job server jar; built with Maven into the cache if missing."""
    name = f"beam-runners-flink-{FLINK_VERSION}-job-server-{JOB_SERVER_BEAM_VERSION}.jar"
    jar = cache_dir() / name
    build = cache_dir() / "job-server-build"
    cmd = ["mvn", "-q", "-B", "-f", str(build / "pom.xml"), "package"]
    if not jar.exists():
        hint = (
            f"The Beam Flink job server jar is missing ({jar}). Fetch it with "
            f"`beamzoo flink fetch`, or by hand: "
            f"`{' '.join(cmd)} && mv {build}/target/{name} {jar}` "
            f"(needs Java, Maven and Maven Central)."
        )
        if not fetch:
            raise RuntimeError(hint)
        need(("java", "mvn"), f"building the Flink job server ({jar})")
        build.mkdir(parents=True, exist_ok=True)
        (build / "pom.xml").write_text(
            _JOB_SERVER_POM.format(flink=FLINK_VERSION, beam=JOB_SERVER_BEAM_VERSION, main=JOB_SERVER_MAIN)
        )
        with announced("building the Flink job server with Maven", "2 minutes", jar):
            proc = subprocess.run(cmd, capture_output=True, text=True)
            built = build / "target" / name
            if proc.returncode != 0 or not built.exists():
                tail = (proc.stdout + proc.stderr)[-2000:]
                raise RuntimeError(f"Building the job server failed: {tail}\n{hint}")
            tmp = jar.with_name(f"{name}.{os.getpid()}.tmp")
            shutil.move(str(built), tmp)
            tmp.rename(jar)
            shutil.rmtree(build / "target", ignore_errors=True)
    _link_into_beam_cache(jar)
    return jar


def _link_into_beam_cache(jar: Path) -> None:
    """So that plain `--runner=FlinkRunner --flink_version=1.19` never downloads."""
    try:
        target = beam_cached_jar_path()
    except ImportError:
        return
    if target.exists() or target.is_symlink():
        if target.resolve() == jar.resolve() or not target.is_symlink():
            return  # ours, or a real jar someone staged: leave it
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        target.symlink_to(jar)
    except OSError:
        shutil.copyfile(jar, target)


def flink_home(fetch: bool = True) -> Path:
    """FLINK_HOME of the Flink distribution (pyflink/ of the PyPI packages)."""
    target = cache_dir() / f"flink-{FLINK_DIST_VERSION}"
    home = target / "pyflink"
    ok = (home / "lib" / f"flink-dist-{FLINK_DIST_VERSION}.jar").exists() and (
        home / "bin" / "jobmanager.sh"
    ).exists()
    if ok:
        return home
    pkgs = [f"apache-flink-libraries=={FLINK_DIST_VERSION}", f"apache-flink=={FLINK_DIST_VERSION}"]
    tmp = target.with_name(target.name + ".tmp")
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", str(tmp), *pkgs]
    hint = (
        f"The Flink distribution is missing ({home}). Fetch it with "
        f"`beamzoo flink fetch`, i.e. `{' '.join(cmd)}` "
        f"then rename {tmp} to {target}."
    )
    if not fetch:
        raise RuntimeError(hint)
    shutil.rmtree(tmp, ignore_errors=True)
    with announced(f"fetching the Flink {FLINK_DIST_VERSION} distribution with pip", "1 minute", home):
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"pip failed: {(proc.stdout + proc.stderr)[-2000:]}\n{hint}")
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
    return home
