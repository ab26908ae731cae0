"""Run a function on untrusted inputs in worker processes that can be killed.

Decoder C code cannot be interrupted from Python, so limits are enforced outside
it, per item: wall time (the parent waits ``seconds``, then SIGKILLs the worker),
CPU time (before each item the worker sets RLIMIT_CPU to its CPU used plus
``cpu_seconds``; SIGXCPU kills it) and memory (RLIMIT_AS: the warm worker's address
space plus ``memory_bytes``). Workers are persistent forks of multiprocessing's
fork server, which imports their modules once; one round trip per item, results
as pickle protocol 5 with numpy buffers out of band. Workers die with the parent:
they watch a pipe only it writes to, and PR_SET_PDEATHSIG covers the fork server.
``env``: variables the workers' libraries read once, when they load (OpenCV's
pixel limit): pools with different ones have their own fork servers, started
with them in their environment.
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import io
import math
import multiprocessing
import multiprocessing.forkserver
import multiprocessing.popen_forkserver
import os
import pickle
import queue
import resource
import signal
import socket
import struct
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from multiprocessing.connection import wait

KINDS = ("timeout", "memory", "crash", "error")
_MEMORY_HINTS = ("Insufficient memory", "Failed to allocate", "bad_alloc")  # OpenCV's and C++'s words for it
_START_LOCK = threading.Lock()  # one Process.start at a time, whichever pool
_START_TIMEOUT = 120.0
_CLOSED = "the IsolatedPool is closed"


@dataclass(frozen=True)
class Limits:
    """Per-input limits. ``memory_bytes``: the address space a worker may add to what it maps
    when warm (imports alone can map 0.7-1.7 GB: pyarrow's mimalloc reserves 1 GiB)."""

    seconds: float = 5.0
    cpu_seconds: float = 5.0
    memory_bytes: int = 2 << 30


class IsolationFailure(Exception):
    """What an item gave instead of a result: ``kind`` is one of KINDS."""

    def __init__(self, kind: str, message: str):
        super().__init__(kind, message)
        self.kind, self.message = kind, message

    def __str__(self):
        return self.message

    def __repr__(self):
        return f"IsolationFailure({self.kind!r}, {self.message!r})"


def _send(conn, obj) -> None:
    """Pickle protocol 5; numpy buffers go out of band, from memory straight to the socket."""
    bufs = []
    head = pickle.dumps(obj, protocol=5, buffer_callback=bufs.append)
    raws = [b.raw() for b in bufs]
    for chunk in (struct.pack(f"<QI{len(raws)}Q", len(head), len(raws), *(r.nbytes for r in raws)) + head, *raws):
        view = memoryview(chunk).cast("B")
        while view:
            view = view[os.write(conn.fileno(), view):]


def _read(conn, size: int) -> bytearray:
    buf = bytearray(size)
    view = memoryview(buf)
    while view:
        n = os.readv(conn.fileno(), [view])
        if not n:
            raise EOFError("the other side closed the connection")
        view = view[n:]
    return buf


def _recv(conn):
    """What ``_send`` sent; its numpy arrays are writable (backed by ``bytearray``s)."""
    size, n = struct.unpack("<QI", _read(conn, 12))
    sizes = struct.unpack(f"<{n}Q", _read(conn, 8 * n))
    head = _read(conn, size)
    return pickle.loads(head, buffers=[_read(conn, s) for s in sizes])


def _set_soft(which: int, soft: int) -> None:
    hard = resource.getrlimit(which)[1]
    resource.setrlimit(which, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))


def _watch(alive) -> None:
    try:
        alive.recv_bytes()
    finally:
        os._exit(0)  # EOF: the parent closed the pool or died


def _serve(fn, conn, alive, limits: Limits) -> None:
    """A worker: item in, ("ok", result) or (kind, message) out, until the parent hangs up."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's business
    signal.signal(signal.SIGXCPU, signal.SIG_DFL)
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the fork server
    threading.Thread(target=_watch, args=(alive,), daemon=True).start()
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.memory_bytes:
        with open("/proc/self/status") as f:
            warm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        _set_soft(resource.RLIMIT_AS, warm + limits.memory_bytes)
    try:
        conn.send_bytes(b"ready")
    except OSError:
        return  # the parent is gone
    while True:
        try:
            item = _recv(conn)
        except (EOFError, OSError):
            return
        if limits.cpu_seconds:
            used = resource.getrusage(resource.RUSAGE_SELF)
            _set_soft(resource.RLIMIT_CPU, math.ceil(used.ru_utime + used.ru_stime + limits.cpu_seconds))
        try:
            out = ("ok", fn(item))
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            memory = isinstance(exc, MemoryError) or any(h in str(exc) for h in _MEMORY_HINTS)
            out = ("memory" if memory else "error", f"{type(exc).__name__}: {str(exc).strip()}".rstrip(": "))
        try:
            try:
                _send(conn, out)
            except OSError:
                raise
            except Exception as exc:  # noqa: BLE001 - a result pickle cannot take
                _send(conn, ("error", f"the result could not be sent: {type(exc).__name__}: {exc}"))
        except OSError:
            return  # the parent is gone


_SERVERS: dict[tuple, multiprocessing.forkserver.ForkServer] = {}  # env -> its fork server


def _server(env: tuple, preload: list[str]) -> multiprocessing.forkserver.ForkServer:
    """The running fork server for ``env`` (it has ``env`` in its environment and imported
    ``preload`` when it started); call under _START_LOCK."""
    server = _SERVERS.get(env)
    if server is None:
        server = _SERVERS[env] = multiprocessing.forkserver.ForkServer()
        server.set_forkserver_preload(preload)
    with _environ(dict(env)):
        server.ensure_running()  # (re)starts it if it is not running
    return server


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class _Popen(multiprocessing.popen_forkserver.Popen):
    """multiprocessing's fork-server Popen, asking the fork server of the process's env."""

    def _launch(self, process_obj):
        from multiprocessing import reduction, spawn, util
        from multiprocessing.context import set_spawning_popen
        prep_data = spawn.get_preparation_data(process_obj._name)
        if process_obj.fn_module != "__main__":  # the user's script is not run again in the worker
            prep_data.pop("init_main_from_path", None)
            prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = _SERVERS[process_obj.env].connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = multiprocessing.forkserver.read_signed(self.sentinel)


class _Process(multiprocessing.context.ForkServerProcess):
    env: tuple = ()
    fn_module = "__main__"

    def _Popen(self, process_obj):  # noqa: N802 - multiprocessing's name
        return _Popen(process_obj)


class IsolatedPool:
    """``workers`` processes running ``fn`` (a module-level function) under ``limits``.

    ``map(items)`` returns, in order, fn's result or an IsolationFailure for each item.
    Thread-safe: the items of concurrent calls share the workers, first come first served.
    """

    def __init__(self, fn, workers: int, limits: Limits = Limits(), env: dict[str, str] | None = None):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.fn, self.workers, self.limits, self.env = fn, workers, limits, dict(env or {})
        self._ctx = multiprocessing.get_context("forkserver")
        self._env = tuple(sorted(self.env.items()))
        self._alive_r, self._alive_w = self._ctx.Pipe(duplex=False)
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._lock, self._closed, self._procs = threading.Lock(), False, {}
        self._threads = [threading.Thread(target=self._slot, name=f"isolate-{i}", daemon=True)
                         for i in range(workers)]
        for t in self._threads:
            t.start()
        atexit.register(self.close)  # before multiprocessing's own exit handler, which would race the slots

    def map(self, items) -> list:
        items = list(items)
        if self._closed:
            raise RuntimeError(_CLOSED)
        futures = [Future() for _ in items]
        for task in zip(futures, items):
            self._tasks.put(task)
        return [f.result() for f in futures]

    def pids(self) -> list[int]:
        """The process ids of the live workers."""
        with self._lock:
            return list(self._procs)

    def close(self) -> None:
        """Kill every worker and end the slot threads (items still queued get an "error")."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            atexit.unregister(self.close)
            for p in self._procs.values():
                p.kill()
        for _ in self._threads:
            self._tasks.put(None)
        for t in self._threads:
            t.join()
        self._alive_w.close()
        self._alive_r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _start(self):
        """A ready worker (process, connection), or the IsolationFailure of a failed start."""
        here, there = self._ctx.Pipe()
        for c in (here, there):  # a 600 KB result in fewer trips through the kernel (capped by wmem_max)
            with socket.socket(fileno=os.dup(c.fileno())) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        proc = _Process(target=_serve, args=(self.fn, there, self._alive_r, self.limits), daemon=True)
        proc.env, proc.fn_module = self._env, self.fn.__module__
        with self._lock, _START_LOCK:
            if self._closed:
                return IsolationFailure("error", _CLOSED)
            # imported once, there; a script of the user's only where the function is its own (a
            # script without a main guard would run again in every worker)
            main = ["__main__"] if self.fn.__module__ == "__main__" else []
            _server(self._env, [*main, __name__, self.fn.__module__])
            proc.start()
            self._procs[proc.pid] = proc
        there.close()
        wait([here, proc.sentinel], _START_TIMEOUT)
        try:
            if here.poll() and here.recv_bytes() == b"ready":
                return proc, here
        except (EOFError, OSError):
            pass
        return self._stop(proc, here, self._dead(proc, "the worker did not start"))

    def _stop(self, proc, conn, failure=None):
        proc.kill()
        proc.join()
        conn.close()
        with self._lock:
            self._procs.pop(proc.pid, None)
        proc.close()
        return failure

    def _dead(self, proc, what: str) -> IsolationFailure:
        proc.join(1)
        code = proc.exitcode
        if code == -signal.SIGXCPU:
            return IsolationFailure("timeout", f"over the CPU limit of {self.limits.cpu_seconds:g} s; worker killed")
        if code == -signal.SIGKILL:
            return IsolationFailure("memory", f"{what}: killed (SIGKILL), most likely out of memory")
        if code is None:
            return IsolationFailure("crash", f"{what}: it does not answer")
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        return IsolationFailure("crash", f"{what}: {how}")

    def _run(self, proc, conn, item):
        """(fn's result or an IsolationFailure, whether the worker may be kept)."""
        try:
            _send(conn, item)
        except (EOFError, OSError):
            return self._dead(proc, "the worker died"), False
        except Exception as exc:  # noqa: BLE001 - pickling failed; nothing was sent
            return IsolationFailure("error", f"the item could not be pickled: {type(exc).__name__}: {exc}"), True
        try:
            wait([conn, proc.sentinel], self.limits.seconds)
            if not conn.poll():
                if proc.is_alive():
                    return IsolationFailure("timeout", f"no result within {self.limits.seconds:g} s; "
                                            "worker killed"), False
                return self._dead(proc, "the worker died"), False
            kind, value = _recv(conn)
        except (EOFError, OSError):
            return self._dead(proc, "the worker died"), False
        return (value, True) if kind == "ok" else (IsolationFailure(kind, value), kind != "memory")

    def _slot(self) -> None:
        """One worker's thread in the parent: takes items, runs them, replaces the worker."""
        worker = self._start()  # warm before the first item
        while (task := self._tasks.get()) is not None:
            future, item = task
            if worker is None and not self._closed:
                worker = self._start()
            if not isinstance(worker, tuple):  # its start failed, or the pool is closed
                result, keep = worker or IsolationFailure("error", _CLOSED), False
            else:
                try:
                    result, keep = self._run(*worker, item)
                except Exception as exc:  # noqa: BLE001 - never leave a map waiting
                    result, keep = IsolationFailure("error", f"isolate: {type(exc).__name__}: {exc}"), False
            if self._closed and isinstance(result, IsolationFailure):
                result = IsolationFailure("error", _CLOSED)
            if not keep:
                if isinstance(worker, tuple):
                    self._stop(*worker)
                worker = None
            future.set_result(result)
            if worker is None and not self._closed:
                worker = self._start()  # warm the replacement before the next item comes
        if isinstance(worker, tuple):
            self._stop(*worker)
