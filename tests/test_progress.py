"""The edge runner's progress bar says it is listing, with no total or ETA, until every source's
listing is known; then it shows the total."""
from __future__ import annotations

import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import textwrap

from beamzoo.core.metrics import Sample
from beamzoo.runners.edge import _Bar
from conftest import ROOT


def bar(*sources):
    out = io.StringIO()
    return _Bar(True, {"dead"}, sources, file=out), out


def test_the_bar_is_listing_until_every_source_is_counted():
    b, out = bar("files", "manifest")
    b.batch_done(None, "files", "source", Sample(rows_in=16, rows_out=16))
    assert (b.bar.total, b.bar.desc) == (None, "listing")
    b.listed("files", 40)
    assert (b.bar.total, b.bar.desc) == (None, "listing")  # the manifest is not counted yet
    b.listed("manifest", 9, exact=False)
    assert (b.bar.total, b.bar.desc) == (49, "")
    b.listed("manifest", 10)  # the source's own listing ended: its count wins
    b.listed("manifest", 3, exact=False)  # a count that comes later is late
    assert b.bar.total == 50
    b.batch_done(None, "write", "sink", Sample(rows_in=30, rows_out=30))
    b.batch_done(None, "dead", "sink", Sample(rows_in=5, rows_out=5))  # counted where they died
    b.batch_done(None, "decode", "map", Sample(rows_in=35, rows_out=30, dead=5))
    b.close()
    assert b.bar.n == 35
    frames = out.getvalue().split("\r")
    assert frames[1].startswith("listing: 0row")
    assert "35/50" in frames[-1]


def test_the_count_thread_gives_the_total():
    b, _ = bar("files")
    b.count("files", lambda: iter(["a", "b", "c"])).join(10)
    assert b.bar.total == 3
    b.close()


def test_a_listing_that_fails_leaves_the_bar_listing():
    def refs():
        yield "a"
        raise OSError("gone")
    b, _ = bar("files")
    b.count("files", refs).join(10)
    assert (b.bar.total, b.bar.desc) == (None, "listing")
    b.close()


def test_the_bar_of_a_run_on_a_terminal_starts_listing_and_ends_at_its_total(tmp_path):
    script = textwrap.dedent(f"""
        from beamzoo.core.graph import GraphBuilder
        from beamzoo.runners.edge import EdgeRunner
        from beamzoo.transforms.sinks import WriteParquet
        from beamzoo.transforms.sources import Rows
        b = GraphBuilder()
        b | Rows([{{"id": f"r{{i}}", "n": i}} for i in range(40)]) | WriteParquet({str(tmp_path / "out")!r})
        EdgeRunner(workers=1, chunk_size=4, progress=True).run(b.graph)
    """)
    main, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # tqdm draws to the width
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=child, stdout=subprocess.DEVNULL, cwd=ROOT)
    os.close(child)
    got = b""
    while True:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        got += chunk
    os.close(main)
    assert proc.wait(60) == 0, got
    frames = [f for f in got.decode().replace("\n", "\r").split("\r") if f.strip()]
    assert frames[0].startswith("listing: 0row")
    assert "40/40" in frames[-1] and "listing" not in frames[-1]
