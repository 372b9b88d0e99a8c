"""The methods' `prepare_data` pass on Ray Data, cached by its inputs.

    ds = prepare_training_data(spec, methods, rows, tokenizer)   # a datasets.Dataset in and out

The raw training rows go into a `ray.data.Dataset`; each method with a `prepare_data` hook maps,
filters, scores (through `ftray.data.inference`) or rebuilds it in the run's method order, and
fills `ctx.report` with what it did. The result is materialised once as parquet under
`<data.cache_dir or output.dir/data_cache>/<key>/` with a manifest (methods, configs, input and model
fingerprints, row counts) and `data_report.json`. The key covers everything that can change the
prepared rows (the data methods' configs, the `data` section that shapes rows, the seed, the model
and the input rows), not training fields such as lr, so a Tune sweep over training fields and a
re-run reuse one cache. `data.recompute=true` ignores the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from ftray.config import RunSpec
from ftray.data.errors import DataError
from ftray.data.formats import format_of_columns, validate_rows
from ftray.methods import Context, Method
from ftray.models import cache_dir, resolve_model_path

PIPELINE_VERSION = 1  # bump when the cache layout or the meaning of a cached file changes
# data fields that do not change which rows come out of prepare_data
_NOT_IN_KEY = {"recompute", "cache_dir", "actors", "actor_threads", "infer_batch_size", "eval_source", "eval_split",
               "eval_max_samples"}
MANIFEST, REPORT, ROWS = "manifest.json", "data_report.json", "rows.parquet"


def data_methods(methods: list[Method]) -> list[Method]:
    """The methods that rewrite the training data."""
    return [m for m in methods if "prepare_data" in type(m).hooks()]


def table_fingerprint(table: pa.Table) -> str:
    """A content hash of an Arrow table (schema and values, in row order)."""
    h = hashlib.blake2b(digest_size=12)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table.combine_chunks())
    h.update(sink.getvalue().to_pybytes())
    return h.hexdigest()


def model_fingerprint(name: str, gguf_file: str | None) -> str:
    """Identify the weights a data method may run: the resolved directory and its files' sizes and times."""
    path = Path(resolve_model_path(name, gguf_file))
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir() if f.is_file())
    return hashlib.blake2b(repr((str(path), files)).encode(), digest_size=12).hexdigest()


def cache_key(spec: RunSpec, methods: list[Method], input_fp: str, model_fp: str) -> dict[str, Any]:
    """What the prepared rows depend on (its hash names the cache entry)."""
    return {
        "version": PIPELINE_VERSION,
        "methods": [{"name": m.name, **m.config.model_dump(mode="json")} for m in methods],
        "data": spec.data.model_dump(mode="json", exclude=_NOT_IN_KEY),
        "task": spec.task.model_dump(mode="json"),
        "seed": spec.train.seed,
        "input": input_fp,
        "model": model_fp,
    }


def cache_root(spec: RunSpec) -> Path:
    """`data.cache_dir`, else `<output.dir>/data_cache` (local output) or ftray's cache (a URI output)."""
    if spec.data.cache_dir:
        return Path(spec.data.cache_dir).expanduser().resolve()
    if "://" in spec.output.dir:
        return cache_dir() / "data"
    return Path(spec.output.dir).expanduser().resolve() / "data_cache"


def prepare_training_data(spec: RunSpec, methods: list[Method], rows: datasets.Dataset, tokenizer: Any,
                          log: Any = print) -> tuple[datasets.Dataset, Path | None]:
    """Run the data methods' `prepare_data` on Ray Data, or reuse their cached output; (rows, cache dir)."""
    hooked = data_methods(methods)
    if not hooked:
        return rows, None
    fmt = format_of_columns(rows.column_names)
    if fmt:  # report bad input rows by number before any model runs over them
        validate_rows(rows, fmt, "training data")
    table = rows.flatten_indices().data.table
    key = cache_key(spec, hooked, table_fingerprint(table), model_fingerprint(spec.model.name, spec.model.gguf_file))
    digest = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=10).hexdigest()
    entry = cache_root(spec) / f"{'-'.join(m.name for m in hooked)}-{digest}"
    names = ", ".join(m.name for m in hooked)
    if (entry / MANIFEST).is_file() and not spec.data.recompute:
        manifest = json.loads((entry / MANIFEST).read_text())
        log(f"prepare_data ({names}): reusing the cache at {entry} ({manifest['rows_in']} → {manifest['rows_out']} rows; "
            "set data.recompute=true to redo it)")
        return datasets.Dataset(pq.read_table(entry / ROWS)), entry
    out, reports, seconds = _run_methods(spec, hooked, table, tokenizer)
    manifest = {**key, "rows_in": table.num_rows, "rows_out": out.num_rows, "seconds": round(seconds, 2),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    _write_entry(entry, out, manifest, reports)
    for name, report in reports.items():
        log(f"prepare_data {name}: {_summary(report)}")
    log(f"prepare_data ({names}): {table.num_rows} → {out.num_rows} rows in {seconds:.1f} s, cached at {entry}")
    return datasets.Dataset(out), entry


def _run_methods(spec: RunSpec, methods: list[Method], table: pa.Table, tokenizer: Any) -> tuple[pa.Table, dict, float]:
    import ray
    import ray.data

    from ftray.train.trainer import ensure_ray

    ensure_ray()
    ray.data.DataContext.get_current().execution_options.preserve_order = True  # seeded methods see a fixed order
    start = time.perf_counter()
    ds = ray.data.from_arrow(blocks_of(table, spec.data.infer_batch_size * 4))
    reports: dict[str, dict] = {}
    for m in methods:
        ctx = Context(spec=spec, tokenizer=tokenizer, report={})
        ds = m.prepare_data(ds, ctx).materialize()
        reports[m.name] = {"rows_out": ds.count(), **ctx.report}
    blocks = [pa.Table.from_pandas(b) if not isinstance(b, pa.Table) else b for b in ray.get(ds.to_arrow_refs())]
    blocks = [b for b in blocks if b.num_rows]
    if not blocks:
        raise DataError(f"prepare_data ({', '.join(m.name for m in methods)}) left no training rows out of {table.num_rows}")
    out = pa.concat_tables(blocks, promote_options="permissive")
    return out, reports, time.perf_counter() - start


def blocks_of(table: pa.Table, rows: int, max_blocks: int = 200) -> list[pa.Table]:
    """`table` cut into blocks of `rows` rows (at most `max_blocks`), so every inference actor gets work and
    batches stay aligned with block boundaries (the same rows per batch as a plain loop over the table)."""
    rows = max(rows, -(-table.num_rows // max_blocks))
    return [table.slice(i, rows) for i in range(0, table.num_rows, rows)] or [table]


def _write_entry(entry: Path, table: pa.Table, manifest: dict, reports: dict) -> None:
    """Write rows, manifest and report to a temporary directory, then rename it into place."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    pq.write_table(table, tmp / ROWS)
    (tmp / REPORT).write_text(json.dumps(reports, indent=2, default=str))
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence marks a complete entry
    if entry.exists():
        shutil.rmtree(entry)
    os.replace(tmp, entry)


def _summary(report: dict) -> str:
    """One log line: the report's scalar and small-dict fields (examples stay in data_report.json)."""
    parts = [f"{k}={v}" for k, v in report.items() if k != "examples" and (not isinstance(v, (list, dict)) or len(str(v)) < 200)]
    return ", ".join(parts)


def copy_report(entry: Path | None, run_dir: Path) -> None:
    """Put the cache entry's data_report.json and manifest next to a run's checkpoints."""
    if entry is None:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    for name in (REPORT, MANIFEST):
        shutil.copy(entry / name, run_dir / name.replace("manifest", "data_manifest"))
