"""The flow primitives: route rows into named branches, merge branches, make
many children of one record, collect the children back per parent, drop columns.

>>> from beamzoo.transforms.sources import Rows
>>> from beamzoo.core.graph import Graph
>>> branches = Graph.source(Rows([{"score": 0.2}, {"score": 0.9}])) | Route(low="score < 0.5")
>>> merged = (branches.low, branches.otherwise) | Merge()
>>> merged.schema.names
['id', 'score']
"""
from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from beamzoo.core.knobs import Knob
from beamzoo.core.op import NO_DEAD_LETTERS, PIECE_BYTES, Operator, Result, dead_letters, error_text
from beamzoo.core.schemas import ID, PARENT_ID, SchemaMismatchError, describe
from beamzoo.transforms.preprocess import image_spec

_COMPARE = {"<": pc.less, "<=": pc.less_equal, ">": pc.greater, ">=": pc.greater_equal,
            "==": pc.equal, "!=": pc.not_equal}
_PREDICATE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*(.+?)\s*$")


def parse_predicate(text: str | dict) -> dict:
    """``"score < 0.5"`` -> ``{"field": "score", "op": "<", "value": 0.5}``."""
    if isinstance(text, dict):
        return {"field": text["field"], "op": text["op"], "value": text["value"]}
    m = _PREDICATE.match(text)
    if not m:
        raise ValueError(f"cannot read the predicate {text!r}; write it as FIELD OP VALUE, "
                         f"e.g. 'score < 0.5' (OP one of {', '.join(_COMPARE)})")
    field, op, value = m.groups()
    try:
        value = float(value) if re.fullmatch(r"-?[0-9.]+(e-?[0-9]+)?", value) else value.strip("'\"")
    except ValueError:
        pass
    return {"field": field, "op": op, "value": value}


def _branches(pairs) -> list:
    return [[str(n), parse_predicate(p)] for n, p in pairs]


class Route(Operator):
    """Send each row to the first branch whose predicate holds, else to ``otherwise``.

    ``Route(low="score < 0.5")`` has the ports ``low`` and ``otherwise``; a null never
    satisfies a predicate. Branches named by keyword come after those in ``branches``.
    """

    name = "route"
    kind = "route"
    default_id = "route"
    knobs = {"branches": Knob([], list, doc="[name, predicate] pairs, tried in order", convert=_branches),
             "otherwise": Knob("otherwise", str, doc="the branch of rows no predicate holds for")}

    def __init__(self, otherwise: str = "otherwise", id: str | None = None, branches=(), **named):
        super().__init__(id=id, branches=[*branches, *named.items()], otherwise=otherwise)

    def configure(self):
        names = [n for n, _ in self.params["branches"]] + [self.params["otherwise"]]
        if not self.params["branches"]:
            raise ValueError("Route needs at least one branch, e.g. Route(low='score < 0.5')")
        if len(set(names)) != len(names):
            raise ValueError(f"Route branch names must differ, got {names}")
        self._ports = tuple(names)

    @property
    def ports(self):
        return self._ports

    def output_schemas(self, inputs):
        (schema,) = inputs
        for _, p in self.params["branches"]:
            if p["field"] not in schema.names:
                raise SchemaMismatchError(f"step {self.id!r} routes on {p['field']!r}, which its input "
                                          f"lacks; the input has: {', '.join(schema.names)}")
        return {port: schema for port in self._ports}

    def process(self, batch):
        left = pa.array(np.ones(batch.num_rows, bool))
        out = {}
        for name, p in self.params["branches"]:
            hit = pc.fill_null(_COMPARE[p["op"]](batch.column(p["field"]), p["value"]), False)
            take = pc.and_(left, hit)
            out[name] = batch.filter(take)
            left = pc.and_(left, pc.invert(hit))
        out[self.params["otherwise"]] = batch.filter(left)
        return Result(out, NO_DEAD_LETTERS)


class Merge(Operator):
    """The rows of every input, laid out as one schema: the union of their columns
    (a column some inputs lack is null there). ``(a, b) | Merge()``."""

    name = "merge"
    kind = "merge"
    default_id = "merge"
    parallel = False

    def output_schemas(self, inputs):
        fields: dict[str, pa.Field] = {}
        for schema in inputs:
            for f in schema:
                if f.name in fields and not fields[f.name].type.equals(f.type):
                    raise SchemaMismatchError(f"step {self.id!r} merges {describe(fields[f.name])} with "
                                              f"{describe(f)}; a merged column needs one type")
                fields.setdefault(f.name, f)
        nullable = {n: not all(n in s.names for s in inputs) for n in fields}
        self.schema = pa.schema([f.with_nullable(f.nullable or nullable[n]) for n, f in fields.items()])
        return {"out": self.schema}

    def process(self, batch):
        n = batch.num_rows
        cols = [batch.column(f.name) if f.name in batch.schema.names else pa.nulls(n, f.type)
                for f in self.schema]
        return Result(pa.record_batch(cols, schema=self.schema), NO_DEAD_LETTERS)


class Drop(Operator):
    """Drop columns (say raw bytes or pixels before a sink)."""

    name = "drop"
    default_id = "drop"
    knobs = {"fields": Knob(None, list, required=True, doc="the columns to drop")}
    positional = ("fields",)

    def configure(self):
        self.consumes = tuple(self.params["fields"])
        self.requires = pa.schema([])

    def output_schemas(self, inputs):
        missing = [f for f in self.consumes if f not in inputs[0].names]
        if missing:
            raise SchemaMismatchError(f"step {self.id!r} drops {missing}, which its input lacks")
        return super().output_schemas(inputs)

    def process(self, batch):
        return Result(batch.drop_columns(list(self.consumes)), NO_DEAD_LETTERS)


class Rename(Operator):
    """Rename columns (``{"old": "new"}``); with ``copy`` keep the old ones too (no bytes
    are copied: both names share the column)."""

    name = "rename"
    default_id = "rename"
    knobs = {"fields": Knob(None, dict, required=True, doc="{old name: new name}"),
             "copy": Knob(False, bool, doc="keep the old names too")}
    positional = ("fields",)

    def configure(self):
        self.consumes = () if self.params["copy"] else tuple(self.params["fields"])

    def produced(self, inputs):
        return list(self.params["fields"].values())

    def output_schemas(self, inputs):
        (schema,) = inputs
        missing = [f for f in self.params["fields"] if f not in schema.names]
        if missing:
            raise SchemaMismatchError(f"step {self.id!r} renames {missing}, which its input lacks")
        renamed = [schema.field(old).with_name(new) for old, new in self.params["fields"].items()]
        return {"out": pa.schema([f for f in schema if f.name not in self.consumes] + renamed)}

    def process(self, batch):
        schema = self.output_schemas([batch.schema])["out"]
        back = {new: old for old, new in self.params["fields"].items()}
        return Result(pa.record_batch([batch.column(back.get(f.name, f.name)) for f in schema], schema=schema),
                      NO_DEAD_LETTERS)


class Explode(Operator):
    """One-to-many over ``image``: each record becomes the records ``children(image)`` gives.

    A child has the id ``<parent id>#<n>``, its ``parent_id``, its number in the
    ``INDEX`` column and what ``children`` gives, and keeps the parent's ``path``
    and ``key``. The ``parents`` port carries each parent (without the image) and
    how many ``children`` it has, for a ``Collect`` to gather them back. A record
    whose ``children`` raises is a dead letter.
    """

    kind = "explode"
    consumes = ("image",)
    KEEP = ("path", "key")
    INDEX = "child"

    @property
    def ports(self):
        return ("out", "parents")

    def output_schemas(self, inputs):
        (schema,) = inputs
        kept = [schema.field(n) for n in self.KEEP if n in schema.names]
        parents = pa.schema([f for f in schema if f.name != "image"] + [pa.field("children", pa.int32())])
        return {"out": pa.schema([ID, *kept, *self.produces]), "parents": parents}

    def children(self, image: dict) -> list[dict]:
        """The children of one image: ``image`` has ``data`` (its pixels, a read-only
        memoryview), ``height``, ``width`` and ``channels``."""
        raise NotImplementedError

    def process(self, batch):
        return self._result(batch, [self._children(batch, i) for i in range(batch.num_rows)])

    def process_pieces(self, batch):
        """Images in order, handed on whenever their children hold over ``PIECE_BYTES``."""
        start, found, size = 0, [], 0
        for i in range(batch.num_rows):
            found.append(self._children(batch, i))
            size += _size(found[-1])
            if size > PIECE_BYTES and i + 1 < batch.num_rows:
                yield self._result(batch.slice(start, len(found)), found)
                start, found, size = i + 1, [], 0
        yield self._result(batch.slice(start, len(found)), found)

    def _children(self, batch, i):
        self.bind()
        im = batch.column("image")[i]  # its pixels as a view of the batch's, not a copy
        try:
            return self.children({"data": memoryview(im["data"].as_buffer()), "height": im["height"].as_py(),
                                  "width": im["width"].as_py(), "channels": im["channels"].as_py()})
        except Exception as exc:  # noqa: BLE001 - a bad record must not kill the run
            return exc

    def _result(self, batch, found: list) -> Result:
        schemas = self.output_schemas([batch.schema])
        ids = batch.column("id").to_pylist()
        keep = {n: batch.column(n).to_pylist() for n in self.KEEP if n in batch.schema.names}
        rows, ok, counts, bad, errors = [], [], [], [], []
        for i, kids in enumerate(found):
            if isinstance(kids, Exception):
                bad.append(i)
                errors.append(error_text(kids))
                continue
            ok.append(i)
            counts.append(len(kids))
            for n, child in enumerate(kids):
                rows.append({"id": f"{ids[i]}#{n}", **{k: v[i] for k, v in keep.items()},
                             "parent_id": ids[i], self.INDEX: n, **child})
        parents = batch.drop_columns(["image"]).take(pa.array(ok, pa.int64()))
        parents = parents.append_column(schemas["parents"].field("children"), pa.array(counts, pa.int32()))
        children = pa.RecordBatch.from_pylist(rows, schema=schemas["out"])
        return Result({"out": children, "parents": parents}, dead_letters(batch, bad, self.id, errors))


def _size(value) -> int:
    """About the bytes ``value`` (children, or an exception) takes in a batch: its bytes values."""
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    if isinstance(value, dict):
        return sum(_size(v) for v in value.values())
    if isinstance(value, list):
        return sum(_size(v) for v in value) if value and isinstance(value[0], (dict, bytes)) else 8 * len(value)
    return 8


class Tiles(Explode):
    """One-to-many: an image -> ``rows`` x ``cols`` tiles, one child record each
    (its ``tile`` number and its ``image``)."""

    name = "tiles"
    default_id = "tiles"
    knobs = {"rows": Knob(2, int, low=1, high=64, doc="tiles down"), "cols": Knob(2, int, low=1, high=64,
                                                                                doc="tiles across"),
             "channels": Knob("RGB", str, choices=("RGB", "BGR"), doc="channel order of the image")}
    INDEX = "tile"

    def configure(self):
        self.requires = pa.schema([image_spec(self.params["channels"]).field("image")])
        self.produces = pa.schema([PARENT_ID, pa.field("tile", pa.int32()), self.requires.field("image")])

    def children(self, image: dict) -> list[dict]:
        return [{"image": tile} for tile in self.split(image)]

    def split(self, im: dict) -> list[dict]:
        img = np.frombuffer(im["data"], np.uint8).reshape(im["height"], im["width"], im["channels"])
        r, c = self.params["rows"], self.params["cols"]
        h, w = img.shape[:2]
        if h < r or w < c:
            raise ValueError(f"image is {w}x{h}, too small for {c}x{r} tiles")
        out = []
        for y in range(r):
            for x in range(c):
                tile = np.ascontiguousarray(img[y * h // r:(y + 1) * h // r, x * w // c:(x + 1) * w // c])
                out.append({"data": tile.tobytes(), "height": tile.shape[0], "width": tile.shape[1],
                            "channels": tile.shape[2]})
        return out


def _child_order(row: dict):
    head, _, n = row["id"].rpartition("#")
    return (head, int(n)) if n.isdigit() else (row["id"], -1)


class Collect(Operator):
    """Gather children back per parent: ``(children, parents) | Collect(["label"])``.

    Each parent comes out once, with list columns ``<prefix><field>`` of its
    children's values (in child order), and its ``children`` count from the
    one-to-many step: children = collected + dead-lettered children.
    """

    name = "collect"
    kind = "collect"
    default_id = "collect"
    parallel = False
    knobs = {"fields": Knob(None, list, required=True, doc="the children's columns to collect"),
             "prefix": Knob("", str, doc="of the collected list columns")}
    positional = ("fields",)

    def produced(self, inputs):
        return [self.params["prefix"] + f for f in self.params["fields"]]

    def output_schemas(self, inputs):
        children, parents = inputs
        for need, schema, what in (("parent_id", children, "children"), ("children", parents, "parents")):
            if need not in schema.names:
                raise SchemaMismatchError(f"step {self.id!r}: its {what} input has no {need!r}; "
                                          "collect reads (children, parents) of a one-to-many step")
        missing = [f for f in self.params["fields"] if f not in children.names]
        if missing:
            raise SchemaMismatchError(f"step {self.id!r} collects {missing}, which the children lack; "
                                      f"they have: {', '.join(children.names)}")
        made = self.produced(inputs)
        clash = [n for n in made if n in parents.names]
        if clash:
            raise SchemaMismatchError(f"step {self.id!r} would make {clash} twice; pass prefix=...")
        lists = [pa.field(n, pa.list_(children.field(f).type))
                 for n, f in zip(made, self.params["fields"])]
        self.schema = pa.schema([*parents, *lists])
        return {"out": self.schema}

    def assemble(self, parents: pa.RecordBatch, children: dict[str, list[dict]]) -> pa.RecordBatch:
        """Parents with their children's values; ``children`` maps a parent id to child rows."""
        ids = parents.column("id").to_pylist()
        cols = [parents.column(n) for n in parents.schema.names]
        for name, f in zip(self.produced([]), self.params["fields"]):
            typ = self.schema.field(name).type
            values = [[c[f] for c in sorted(children.get(i, ()), key=_child_order)] for i in ids]
            cols.append(pa.array(values, typ))
        return pa.record_batch(cols, schema=self.schema)
