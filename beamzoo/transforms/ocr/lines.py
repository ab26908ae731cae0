"""An image's recognized regions as lines in reading order, and its text.

Regions are read top to bottom; regions whose tops are within half a line's
height of each other form one row, read left to right. Lines scored below
``min_score`` (usually not text at all) are left out. ``text`` has a row a
line, its regions joined by a space.
"""
from __future__ import annotations

import pyarrow as pa

from beamzoo.core.knobs import Knob
from beamzoo.core.op import RowOperator
from beamzoo.transforms.ocr.images import QUAD

LINE = pa.struct([("text", pa.string()), ("score", pa.float32()), ("box", QUAD)])


def reading_order(boxes: list) -> list[list[int]]:
    """Indices of ``boxes`` (each four (x, y) corners) in reading order, row by row."""
    def top(i):
        return min(p[1] for p in boxes[i])

    def height(i):
        return max(p[1] for p in boxes[i]) - top(i)

    def left(i):
        return min(p[0] for p in boxes[i])

    rows: list[list[int]] = []
    for i in sorted(range(len(boxes)), key=lambda i: (top(i), left(i))):
        if rows and abs(top(i) - top(rows[-1][0])) < 0.5 * min(height(i), height(rows[-1][0])):
            rows[-1].append(i)
        else:
            rows.append([i])
    return [sorted(row, key=left) for row in rows]


class TextLines(RowOperator):
    """Collected regions (``<prefix>text``, ``<prefix>score``, ``<prefix>box``) ->
    ``lines`` (text, score, box each, in reading order) and ``text`` (a row a line)."""

    name = "text_lines"
    default_id = "lines"
    knobs = {"min_score": Knob(0.5, float, low=0, high=1, doc="leave out lines scored below this"),
             "prefix": Knob("region_", str, doc="of the collected columns")}

    def configure(self):
        p = self.params["prefix"]
        self.names = (f"{p}text", f"{p}score", f"{p}box")
        self.requires = pa.schema([pa.field(self.names[0], pa.list_(pa.string())),
                                   pa.field(self.names[1], pa.list_(pa.float32())),
                                   pa.field(self.names[2], pa.list_(QUAD))])
        self.produces = pa.schema([pa.field("text", pa.string()), pa.field("lines", pa.list_(LINE))])
        self.consumes = self.names

    def process_row(self, row):
        texts, scores, boxes = (row[n] for n in self.names)
        keep = [i for i in range(len(texts)) if scores[i] >= self.params["min_score"]]
        rows = [[keep[k] for k in r] for r in reading_order([boxes[i] for i in keep])]
        lines = [{"text": texts[i], "score": scores[i], "box": boxes[i]} for r in rows for i in r]
        return {"text": "\n".join(" ".join(texts[i] for i in r) for r in rows), "lines": lines}
