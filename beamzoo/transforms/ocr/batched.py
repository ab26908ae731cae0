"""A map step that runs a model on its rows in batches: each row is prepared on
its own (a row that cannot be is a dead letter), batches run together, and a
batch that fails is run again row by row so that only the bad rows die."""
from __future__ import annotations

import pyarrow as pa

from beamzoo.core.op import Operator, Result, dead_letters, error_text
from beamzoo.transforms.ocr.models import UsesModel


class BatchedModel(UsesModel, Operator):
    """Subclasses set ``knobs`` (with ``model``, ``batch_size``, ``intra_op_threads``)
    and implement ``prepare(row)``, ``run(prepared) -> [dict]`` and maybe ``batches``.
    ``task``: what the model card must be for."""

    def configure(self):
        self.use_model()

    def prepare(self, row: dict):
        raise NotImplementedError

    def batches(self, prepared: list) -> list[list[int]]:
        """Which prepared rows run together: ``batch_size`` at a time, in order."""
        size = self.params["batch_size"]
        return [list(range(i, min(i + size, len(prepared)))) for i in range(0, len(prepared), size)]

    def run(self, prepared: list) -> list[dict]:
        raise NotImplementedError

    def process(self, batch: pa.RecordBatch) -> Result:
        self.bind()
        columns = {f.name: batch.column(f.name).to_pylist() for f in self.requires}
        ready, rows, bad, errors = [], [], [], []
        for i in range(batch.num_rows):
            try:
                ready.append(self.prepare({n: c[i] for n, c in columns.items()}))
                rows.append(i)
            except Exception as exc:  # noqa: BLE001 - a bad record must not kill the run
                bad.append(i)
                errors.append(error_text(exc))
        results: dict[int, dict] = {}
        for part in self.batches(ready):
            try:
                results.update(zip(part, self.run([ready[j] for j in part])))
            except Exception:  # noqa: BLE001 - find the row that fails
                for j in part:
                    try:
                        results[j] = self.run([ready[j]])[0]
                    except Exception as exc:  # noqa: BLE001
                        bad.append(rows[j])
                        errors.append(error_text(exc))
        done = sorted(results)
        keep = [rows[j] for j in done]
        schema = self.output_schemas([batch.schema])["out"]
        kept = batch.take(pa.array(keep, pa.int64()))
        made = {f.name: pa.array([results[j][f.name] for j in done], f.type) for f in self.produces}
        out = pa.record_batch([made[f.name] if f.name in made else kept.column(f.name) for f in schema],
                              schema=schema)
        order_bad = sorted(range(len(bad)), key=lambda k: bad[k])
        return Result(out, dead_letters(batch, [bad[k] for k in order_bad], self.id, [errors[k] for k in order_bad]))
