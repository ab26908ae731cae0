"""Run Beam Python pipelines on Apache Flink, embedded or on a local cluster.

Two pieces are fetched once into a cache (``$BEAMZOO_CACHE/flink``, default
``~/.cache/beamzoo/flink``):

* the Beam Flink job server jar.  Maven Central as reached from here serves no
  ``beam-runners-flink-*-job-server`` jar at all, and no ``beam-runners-flink-2.x``
  runner, so the jar is assembled with Maven (shade plugin) from the newest
  runner library whose whole dependency tree is served:
  ``org.apache.beam:beam-runners-flink-1.19:2.62.0`` (Flink 1.19.0 client).
  The Beam 2.77 Python SDK talks to it over the portable job/Fn API.
* a Flink 1.19 distribution, from the PyPI packages ``apache-flink-libraries``
  (lib/, opt/, plugins/) and ``apache-flink`` (bin/, conf/), installed with
  ``pip install --no-deps --target`` so that nothing lands in the venv
  (apache-flink pins an old apache-beam).

``cluster_up()`` starts a JobManager and a TaskManager (separate JVMs, via the
distribution's bin scripts) and a Beam worker pool for
``--environment_type=EXTERNAL``; ``cluster_down()`` stops all of them.

CLI: ``python -m beamzoo.runners.flink fetch|up|down|status``.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

FLINK_VERSION = "1.19"  # Beam's --flink_version (the runner's Flink minor)
FLINK_DIST_VERSION = "1.19.3"  # the cluster: apache-flink(-libraries) on PyPI
JOB_SERVER_BEAM_VERSION = "2.62.0"  # beam-runners-flink-1.19 release it is built from
JOB_SERVER_MAIN = "org.apache.beam.runners.flink.FlinkJobServerDriver"
JM_RPC_PORT = 6123

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
    root = os.environ.get("BEAMZOO_CACHE")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "beamzoo"
    return base / "flink"


def run_dir() -> Path:
    """Config, logs and pid files of the local cluster."""
    return cache_dir() / "run"


def beam_cached_jar_path() -> Path:
    """Where Beam's JavaJarServer looks for the job server of FLINK_VERSION
    before downloading it (~/.apache_beam/cache/jars/<basename of maven url>)."""
    from apache_beam.utils.subprocess_server import JavaJarServer

    url = JavaJarServer.path_to_beam_jar(f":runners:flink:{FLINK_VERSION}:job-server:shadowJar")
    return Path(JavaJarServer.JAR_CACHE) / os.path.basename(url)


# ---------------------------------------------------------------- fetching


def job_server_jar(fetch: bool = True) -> Path:
    """The Flink job server jar; built with Maven into the cache if missing."""
    name = f"beam-runners-flink-{FLINK_VERSION}-job-server-{JOB_SERVER_BEAM_VERSION}.jar"
    jar = cache_dir() / name
    build = cache_dir() / "job-server-build"
    cmd = ["mvn", "-q", "-B", "-f", str(build / "pom.xml"), "package"]
    if not jar.exists():
        build.mkdir(parents=True, exist_ok=True)
        (build / "pom.xml").write_text(
            _JOB_SERVER_POM.format(flink=FLINK_VERSION, beam=JOB_SERVER_BEAM_VERSION, main=JOB_SERVER_MAIN)
        )
        hint = (
            f"The Beam Flink job server jar is missing ({jar}). Fetch it with "
            f"`{sys.executable} -m beamzoo.runners.flink fetch`, or by hand: "
            f"`{' '.join(cmd)} && mv {build}/target/{name} {jar}` "
            f"(needs Java, Maven and Maven Central)."
        )
        if not fetch:
            raise RuntimeError(hint)
        if shutil.which("mvn") is None:
            raise RuntimeError("mvn not found (apt-get install maven). " + hint)
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
        f"`{sys.executable} -m beamzoo.runners.flink fetch`, i.e. `{' '.join(cmd)}` "
        f"then rename {tmp} to {target}."
    )
    if not fetch:
        raise RuntimeError(hint)
    shutil.rmtree(tmp, ignore_errors=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pip failed: {(proc.stdout + proc.stderr)[-2000:]}\n{hint}")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    return home


# ---------------------------------------------------------------- pipeline options


def pipeline_args(master: str, *, parallelism: int = 2, worker_port: int = 50000, fetch: bool = True) -> list[str]:
    """Beam options for FlinkRunner: `[local]` (embedded Flink, LOOPBACK
    workers) or `host:port` of a cluster's REST endpoint (EXTERNAL workers
    from the worker pool that cluster_up() starts)."""
    args = [
        "--runner=FlinkRunner",
        f"--flink_master={master}",
        f"--flink_version={FLINK_VERSION}",
        f"--flink_job_server_jar={job_server_jar(fetch)}",
    ]
    if master == "[local]":
        return args + ["--environment_type=LOOPBACK"]
    return args + [
        "--environment_type=EXTERNAL",
        f"--environment_config=localhost:{worker_port}",
        f"--parallelism={parallelism}",
        # one Python worker process per slot; the default (1) would run every
        # subtask of a TaskManager in a single process
        f"--sdk_worker_parallelism={parallelism}",
    ]


# ---------------------------------------------------------------- local cluster

_DAEMONS = {"jobmanager": "standalonesession", "taskmanager": "taskexecutor"}
_POOLS: dict[int, subprocess.Popen] = {}  # worker pools started by this process
_IDENT = "beamzoo"  # FLINK_IDENT_STRING: names the daemons' pid and log files
# what each process's command line holds, so that a recycled pid is never signalled
_MARKERS = {
    "jobmanager": "StandaloneSessionClusterEntrypoint",
    "taskmanager": "TaskManagerRunner",
    "worker-pool": "worker_pool_main",
}


def _pid_files() -> dict[str, Path]:
    pids = run_dir() / "pid"
    files = {name: pids / f"flink-{_IDENT}-{daemon}.pid" for name, daemon in _DAEMONS.items()}
    files["worker-pool"] = pids / "beam-worker-pool.pid"
    return files


def _read_pids(path: Path) -> list[int]:
    try:
        return [int(x) for x in path.read_text().split()]
    except (FileNotFoundError, ValueError):
        return []


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie is gone
    except (FileNotFoundError, IndexError):
        return False


def _live(name: str) -> list[int]:
    """Live pids recorded for one of the cluster's processes (see _MARKERS)."""
    pids = []
    for pid in _read_pids(_pid_files()[name]):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if _MARKERS[name] in cmdline and _alive(pid):
            pids.append(pid)
    return pids


def _port_owner(port: int) -> str:
    """`pid N (command)` listening on port, from /proc (Linux), or ''."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(f"socket:[{f[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if os.readlink(fd) in inodes:
                    cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:160]
                    return f"pid {proc.name} ({cmd.strip()})"
        except OSError:
            continue
    return ""


def _port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _overview(rest_port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://localhost:{rest_port}/overview", timeout=2) as r:
            return json.load(r)
    except (OSError, ValueError):
        return None


def _write_conf(conf: Path, home: Path, parallelism: int, rest_port: int) -> None:
    conf.mkdir(parents=True, exist_ok=True)
    for name in ("log4j.properties", "log4j-console.properties"):
        shutil.copyfile(home / "conf" / name, conf / name)
    # Java 17 needs the --add-opens/--add-exports that Flink's default config carries.
    java_opts = _default_java_opts(home)
    run = run_dir()
    settings = {
        "env.java.opts.all": java_opts,
        "env.log.dir": run / "log",
        "env.pid.dir": run / "pid",
        "io.tmp.dirs": run / "tmp",
        "jobmanager.rpc.address": "localhost",
        "jobmanager.rpc.port": JM_RPC_PORT,
        "jobmanager.bind-host": "localhost",
        "jobmanager.memory.process.size": "1024m",
        "taskmanager.host": "localhost",
        "taskmanager.bind-host": "localhost",
        "taskmanager.numberOfTaskSlots": parallelism,
        "taskmanager.memory.process.size": "2048m",
        "taskmanager.memory.managed.fraction": 0.25,
        # a Beam graph has many operators, each with its own network channels
        "taskmanager.memory.network.min": "256mb",
        "taskmanager.memory.network.max": "256mb",
        "parallelism.default": parallelism,
        "rest.address": "localhost",
        "rest.bind-address": "localhost",
        "rest.port": rest_port,
        # notice a lost TaskManager in seconds, not the default 50 s
        "heartbeat.interval": 2000,
        "heartbeat.timeout": 10000,
        # restart a job that lost a TaskManager (Beam's batch translation leaves
        # the restart strategy to the cluster)
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": 5,
        "restart-strategy.fixed-delay.delay": "5 s",
    }
    (run / "tmp").mkdir(parents=True, exist_ok=True)
    text = "".join(f"{k}: {v if isinstance(v, (int, float)) else json.dumps(str(v))}\n" for k, v in settings.items())
    (conf / "config.yaml").write_text(text)


def _default_java_opts(home: Path) -> str:
    lines = (home / "conf" / "config.yaml").read_text().splitlines()
    for i, line in enumerate(lines):  # env: / java: / opts: / all: <flags>
        if line.strip().startswith("all:") and i >= 1 and lines[i - 1].strip() == "opts:":
            return line.split(":", 1)[1].strip()
    return ""


def _check_ports_free(ports: dict[str, int]) -> None:
    for what, port in ports.items():
        if _port_in_use(port):
            owner = _port_owner(port) or "an unknown process"
            raise RuntimeError(
                f"Port {port} ({what}) is already in use by {owner}. Stop it first "
                f"(if it is a beamzoo cluster: `{sys.executable} -m beamzoo.runners.flink down`)."
            )


def cluster_up(parallelism: int = 2, rest_port: int = 8081, worker_port: int = 50000, timeout: float = 120) -> dict:
    """Start JobManager + TaskManager JVMs and a Beam worker pool; wait until
    the TaskManager's slots are registered and the worker pool listens."""
    home = flink_home()
    job_server_jar()  # fetch now, not in the middle of the first pipeline
    run = run_dir()
    for name, pidfile in _pid_files().items():
        live = _live(name)
        if live:
            raise RuntimeError(
                f"A local cluster already runs ({name}: pid {live}); "
                f"`{sys.executable} -m beamzoo.runners.flink down` first."
            )
        pidfile.unlink(missing_ok=True)
    _check_ports_free({"Flink REST": rest_port, "Flink JobManager RPC": JM_RPC_PORT, "Beam worker pool": worker_port})

    conf = run / "conf"
    _write_conf(conf, home, parallelism, rest_port)
    (run / "log").mkdir(parents=True, exist_ok=True)
    (run / "pid").mkdir(parents=True, exist_ok=True)
    (run / "cluster.json").write_text(
        json.dumps({"parallelism": parallelism, "rest_port": rest_port, "worker_port": worker_port})
    )
    # The worker pool starts its workers as plain `python`: make that this
    # interpreter (a script, not a symlink: a symlinked venv python loses the venv).
    shim = run / "bin" / "python"
    shim.parent.mkdir(exist_ok=True)
    tmp = shim.with_name("python.tmp")
    tmp.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    tmp.chmod(0o755)
    os.replace(tmp, shim)  # replaces the file itself, never writes through a link
    env = _env()
    try:
        for name in _DAEMONS:
            _start_daemon(name)
        with open(run / "log" / "beam-worker-pool.log", "ab") as log:
            pool = subprocess.Popen(
                [sys.executable, "-m", "apache_beam.runners.worker.worker_pool_main", f"--service_port={worker_port}"],
                env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,  # own process group: its workers are stopped with it
            )
        _pid_files()["worker-pool"].write_text(f"{pool.pid}\n")
        _POOLS[pool.pid] = pool  # to reap it in cluster_down() (no zombie, no ResourceWarning)
        deadline = time.monotonic() + timeout
        while True:
            ov = _overview(rest_port) or {}
            ready = (
                ov.get("taskmanagers", 0) >= 1
                and ov.get("slots-total", 0) >= parallelism
                and _port_in_use(worker_port)
            )
            if ready:
                return cluster_status()
            # pids we just started (a daemon may not have exec'd java yet: no marker check)
            dead = [n for n, f in _pid_files().items() if not any(_alive(p) for p in _read_pids(f))]
            if dead or time.monotonic() > deadline:
                why = f"{', '.join(dead)} died" if dead else f"not ready after {timeout:.0f}s"
                raise RuntimeError(f"Local Flink cluster failed to start: {why}; logs in {run / 'log'}")
            time.sleep(0.5)
    except BaseException:
        with contextlib.suppress(Exception):  # keep the original error
            cluster_down()
        raise


def _env() -> dict:
    run = run_dir()
    env = dict(os.environ, FLINK_CONF_DIR=str(run / "conf"), FLINK_LOG_DIR=str(run / "log"),
               FLINK_PID_DIR=str(run / "pid"), FLINK_IDENT_STRING=_IDENT)
    env["PATH"] = str(run / "bin") + os.pathsep + env.get("PATH", "")
    return env


def _start_daemon(name: str) -> None:
    """Start one more jobmanager or taskmanager JVM with the cluster's config."""
    script = flink_home(fetch=False) / "bin" / f"{name}.sh"
    proc = subprocess.run(["bash", str(script), "start"], env=_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        out = (proc.stdout + proc.stderr).strip()[-1500:]
        raise RuntimeError(f"{name}.sh start failed: {out}\nlogs in {run_dir() / 'log'}")


def start_taskmanager() -> None:
    """Add a TaskManager to the running local cluster (e.g. after one was lost)."""
    _start_daemon("taskmanager")


def taskmanager_pids() -> list[int]:
    return _live("taskmanager")


def cluster_down(timeout: float = 60) -> None:
    """Stop the JVMs and the worker pool (with its workers) that cluster_up()
    started; verify that they are gone and their ports are free."""
    pool = _live("worker-pool")
    jvms = _live("jobmanager") + _live("taskmanager")
    for pid in pool:  # SIGINT: the pool stops its workers; then the whole group
        _signal_group(pid, signal.SIGINT)
    for pid in jvms:
        _signal(pid, signal.SIGTERM)
    everyone = pool + jvms
    if not everyone:
        _reap()
        for f in _pid_files().values():  # stale ones
            f.unlink(missing_ok=True)
        return
    if not _wait_gone(everyone, timeout / 2):
        for pid in pool:
            _signal_group(pid, signal.SIGKILL)
        for pid in jvms:
            _signal(pid, signal.SIGKILL)
        _wait_gone(everyone, timeout / 2)
    for pid in pool:  # stray workers left in the pool's process group
        _signal_group(pid, signal.SIGKILL)
    _reap()
    left = [p for p in everyone if _alive(p)]
    if left:
        raise RuntimeError(f"Local Flink cluster processes still alive: {left}")
    for f in _pid_files().values():
        f.unlink(missing_ok=True)
    ports = _ports()
    deadline = time.monotonic() + 10
    while busy := [p for p in ports if _port_in_use(p)]:
        if time.monotonic() > deadline:
            raise RuntimeError(f"Ports still in use after cluster_down: {busy} ({_port_owner(busy[0])})")
        time.sleep(0.2)


def _reap() -> None:
    for pid, proc in list(_POOLS.items()):  # pools this process started and that ended
        if not _alive(pid):
            proc.wait(5)
            del _POOLS[pid]


def _ports() -> list[int]:
    try:
        c = json.loads((run_dir() / "cluster.json").read_text())
        return [c["rest_port"], JM_RPC_PORT, c["worker_port"]]
    except (OSError, ValueError, KeyError):
        return [8081, JM_RPC_PORT, 50000]


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the pool leads its own group (start_new_session)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def cluster_status() -> dict:
    """Pids (alive ones) of the local cluster and Flink's REST /overview."""
    pids = {name: _live(name) for name in _MARKERS}
    rest_port, _, worker_port = _ports()
    return {
        "pids": pids,
        "rest": f"localhost:{rest_port}",
        "worker_pool": f"localhost:{worker_port}",
        "overview": _overview(rest_port),
        "run_dir": str(run_dir()),
    }


# ---------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m beamzoo.runners.flink", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("fetch", help="fetch the job server jar and the Flink distribution")
    up = sub.add_parser("up", help="start a local Flink cluster and a Beam worker pool")
    up.add_argument("--parallelism", type=int, default=2)
    up.add_argument("--rest-port", type=int, default=8081)
    up.add_argument("--worker-port", type=int, default=50000)
    sub.add_parser("down", help="stop the local cluster")
    sub.add_parser("status", help="show the local cluster")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        print(job_server_jar())
        print(flink_home())
    elif args.cmd == "up":
        info = cluster_up(args.parallelism, args.rest_port, args.worker_port)
        print(json.dumps(info, indent=2))
        print("pipeline options:", " ".join(pipeline_args(info["rest"], parallelism=args.parallelism,
                                                          worker_port=args.worker_port)))
    elif args.cmd == "down":
        cluster_down()
    else:
        print(json.dumps(cluster_status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
