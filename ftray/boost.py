"""LLMBoost chain training: one Ray Train run per member, resumable at the first unfinished stage.

    ftray boost llmboost --members 2          (the recipe must list method `llmboost`)

Stage k is an ordinary `ftray.train.trainer.run` of the recipe with `llmboost.stage = k` and
`llmboost.chain_dir` = the chain directory: its workers load members < k from there (frozen) and train
member k. Its final export is itself a chain of k members; the driver then replaces the chain directory with
it (copied to a sibling, swapped in by renames) and records the stage in `manifest.json` (`finished_stages`,
plus each stage's run directory and metrics). A chain interrupted after stage k therefore resumes at
stage k+1: run the same command again. A stage interrupted midway starts over (its partial run directory is
removed). Delete the chain directory to start from scratch.

Layout under `output.dir` (`<name>` = `output.name`, else the recipe's file stem, so that a rerun finds the
chain again): `<name>-chain/` the chain (config.json, model.safetensors, manifest.json, tokenizer),
`<name>-stage<k>/` the stage runs. The workers read `chain_dir` as a local path, so on a multi-node cluster
`output.dir` must be shared storage mounted at the same path on every node (URIs are refused).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ftray.config import RunSpec
from ftray.methods.llmboost.model import MANIFEST


def chain_paths(spec: RunSpec, recipe: str | None) -> tuple[Path, str]:
    """The chain directory and the run-name prefix of its stages."""
    if "://" in spec.output.dir:
        raise ValueError(f"output.dir {spec.output.dir!r}: ftray boost needs a local or mounted directory (the workers read the chain from it)")
    name = spec.output.name or (Path(recipe).stem if recipe else "llmboost")
    return Path(spec.output.dir).expanduser().resolve() / f"{name}-chain", name


def read_manifest(chain: Path) -> dict[str, Any]:
    """The chain's manifest, or an empty one; recovers a swap interrupted between its two renames."""
    old = chain.with_name(f".{chain.name}.old")
    if not chain.exists() and old.exists():
        os.replace(old, chain)
    file = chain / MANIFEST
    return json.loads(file.read_text()) if file.exists() else {"finished_stages": 0, "stages": []}


def stage_spec(spec: RunSpec, index: int, stage: int, members: int, chain: Path, name: str) -> RunSpec:
    """`spec` for stage `stage`: the llmboost entry pinned to that stage and the chain, its own run name."""
    raw = spec.model_dump(mode="json")
    raw["methods"][index] |= {"stage": stage, "members": members, "chain_dir": str(chain) if stage > 1 else None}
    raw["output"]["name"] = f"{name}-stage{stage}"
    return RunSpec.model_validate(raw)


def commit_stage(final: Path, chain: Path, manifest: dict[str, Any], record: dict[str, Any]) -> dict[str, Any]:
    """Make the stage's final export the chain directory, with the stage recorded in its manifest."""
    tmp, old = chain.with_name(f".{chain.name}.tmp"), chain.with_name(f".{chain.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(final, tmp)
    model_manifest = json.loads((tmp / MANIFEST).read_text())
    merged = {**model_manifest, "stages": [*manifest.get("stages", []), record]}
    (tmp / MANIFEST).write_text(json.dumps(merged, indent=2))
    if chain.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(chain, old)
    os.replace(tmp, chain)
    shutil.rmtree(old, ignore_errors=True)
    return merged


def run_chain(spec: RunSpec, members: int | None = None, recipe: str | None = None, log=print) -> dict[str, Any]:
    """Train the recipe's LLMBoost chain stage by stage (from the first unfinished one); returns the manifest."""
    from ftray.train.trainer import run

    index = next((i for i, m in enumerate(spec.methods) if m["name"] == "llmboost"), None)
    if index is None:
        raise ValueError("ftray boost: the recipe's methods list no `llmboost` entry")
    total = members or spec.methods[index]["members"]
    chain, name = chain_paths(spec, recipe)
    manifest = read_manifest(chain)
    done = manifest["finished_stages"]
    if done and manifest.get("base_model") and spec.methods[index].get("layers") not in (None, manifest["layers"]):
        raise ValueError(f"{chain}: the chain was built with layers {manifest['layers']}, the recipe asks for "
                         f"{spec.methods[index]['layers']}; delete the chain directory to start over")
    if done >= total:
        log(f"[ftray] {chain}: all {total} stages finished")
    for stage in range(done + 1, total + 1):
        s = stage_spec(spec, index, stage, total, chain, name)
        partial = Path(s.output.dir).expanduser().resolve() / s.output.name
        if partial.exists():  # an interrupted attempt at this stage: start it over
            shutil.rmtree(partial)
        log(f"[ftray] llmboost stage {stage}/{total}: training member {stage}" + (f" on members 1..{stage - 1} of {chain}" if stage > 1 else ""))
        result = run(s, recipe)
        if result.final_dir is None:
            raise RuntimeError(f"stage {stage}: the run {result.run_dir} left no final export")
        record = {"stage": stage, "run_dir": str(result.run_dir),
                  "metrics": {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}}
        manifest = commit_stage(Path(result.final_dir), chain, manifest, record)
        log(f"[ftray] llmboost stage {stage}/{total} done: {chain}")
    return {"chain": str(chain), **manifest}
