"""Run Beam Python pipelines on Apache Flink, embedded or on a local cluster.

``pipeline_args`` gives FlinkRunner's options. ``cluster_up()`` starts a
JobManager and a TaskManager (separate JVMs, via the distribution's bin
scripts) and a Beam worker pool for ``--environment_type=EXTERNAL``;
``cluster_down()`` stops all of them. What they need is fetched by
``beamzoo.runners.flink_fetch``.

CLI: ``beamzoo flink fetch|up|down|status``.
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

from beamzoo.runners.flink_fetch import (  # noqa: F401 - part of this module's API
    FLINK_DIST_VERSION, FLINK_VERSION, JOB_SERVER_BEAM_VERSION, MissingTool, cache_dir, flink_home, job_server_jar)

JM_RPC_PORT = 6123


def run_dir() -> Path:
    """Config, logs and pid files of the local cluster."""
    return cache_dir() / "run"


# ---------------------------------------------------------------- pipeline options


def pipeline_args(master: str, *, parallelism: int = 2, worker_port: int | None = None, fetch: bool = True) -> list[str]:
    """Beam options for FlinkRunner: `[local]` (embedded Flink, LOOPBACK
    workers) or `host:port` of a cluster's REST endpoint (EXTERNAL workers
    from the worker pool that cluster_up() starts: its port when ``master`` is
    the local cluster's, else 50000)."""
    args = [
        "--runner=FlinkRunner",
        f"--flink_master={master}",
        f"--flink_version={FLINK_VERSION}",
        f"--flink_job_server_jar={job_server_jar(fetch)}",
    ]
    if master == "[local]":  # workers are threads of this process; subtasks one per core
        return args + ["--environment_type=LOOPBACK", f"--parallelism={os.cpu_count() or 1}"]
    if worker_port is None:
        worker_port = _local_worker_port(master)
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


def _write_conf(conf: Path, home: Path, parallelism: int, rest_port: int, rpc_port: int) -> None:
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
        "jobmanager.rpc.port": rpc_port,
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
                f"(if it is a beamzoo cluster: `beamzoo flink down`)."
            )


def cluster_up(parallelism: int = 2, rest_port: int = 8081, worker_port: int = 50000, timeout: float = 120,
               rpc_port: int = JM_RPC_PORT) -> dict:
    """Start JobManager + TaskManager JVMs and a Beam worker pool; wait until
    the TaskManager's slots are registered and the worker pool listens. The
    TaskManager's own ports are chosen free by Flink."""
    home = flink_home()
    job_server_jar()  # fetch now, not in the middle of the first pipeline
    run = run_dir()
    for name, pidfile in _pid_files().items():
        live = _live(name)
        if live:
            raise RuntimeError(
                f"A local cluster already runs ({name}: pid {live}); "
                f"`beamzoo flink down` first."
            )
        pidfile.unlink(missing_ok=True)
    _check_ports_free({"Flink REST": rest_port, "Flink JobManager RPC": rpc_port, "Beam worker pool": worker_port})

    conf = run / "conf"
    _write_conf(conf, home, parallelism, rest_port, rpc_port)
    (run / "log").mkdir(parents=True, exist_ok=True)
    (run / "pid").mkdir(parents=True, exist_ok=True)
    (run / "cluster.json").write_text(
        json.dumps({"parallelism": parallelism, "rest_port": rest_port, "worker_port": worker_port,
                    "rpc_port": rpc_port})
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


def _local_worker_port(master: str) -> int:
    """The worker pool's port of the local cluster when ``master`` is its REST endpoint, else 50000."""
    rest, _, worker = _ports()
    return worker if master.rsplit(":", 1)[-1] == str(rest) else 50000


def _ports() -> list[int]:
    try:
        c = json.loads((run_dir() / "cluster.json").read_text())
        return [c["rest_port"], c.get("rpc_port", JM_RPC_PORT), c["worker_port"]]
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


def main(argv: list[str] | None = None, parser_class=argparse.ArgumentParser) -> int:
    """``beamzoo flink``; ``parser_class`` is the command line's parser (one-line mistakes)."""
    parser = parser_class(prog="beamzoo flink", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{fetch,up,down,status}")
    sub.add_parser("fetch", help="fetch the job server jar and the Flink distribution")
    up = sub.add_parser("up", help="start a local Flink cluster and a Beam worker pool")
    up.add_argument("--parallelism", type=int, default=2)
    up.add_argument("--rest-port", type=int, default=8081)
    up.add_argument("--worker-port", type=int, default=50000)
    up.add_argument("--rpc-port", type=int, default=JM_RPC_PORT)
    sub.add_parser("down", help="stop the local cluster")
    sub.add_parser("status", help="show the local cluster")
    args = parser.parse_args(argv)
    if args.cmd == "fetch":
        try:
            print(job_server_jar())
        except MissingTool as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(flink_home())
    elif args.cmd == "up":
        info = cluster_up(args.parallelism, args.rest_port, args.worker_port, rpc_port=args.rpc_port)
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
