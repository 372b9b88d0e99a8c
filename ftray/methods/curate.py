"""curate — the SFT data-curation rules of Yi (01.AI, Yi: Open Foundation Models, 2403.04652, §4) that a tool
can apply: quality over quantity, every filter a documented field, each one's drops counted in data_report.json.

Filters, in this order (each off when its field is null):
1. length: response (and prompt) length bounds in characters;
2. format: a regular expression every response must match (e.g. a CoT answer line, a list body);
3. repetition: drop responses that repeat themselves — the share of word n-grams that repeat an earlier
   n-gram of the same response (Gopher's duplicate n-gram fraction, on words) above a threshold;
4. near-duplicates: drop a row whose text has Jaccard similarity ≥ threshold with a row kept before it
   (word 3-gram shingles, estimated by MinHash with LSH banding; the first of each group is kept);
5. diversity / tag balance: with a tag column (a task, topic or capability tag, e.g. InsTag-style), keep a
   fraction `tag_rates` of each tag (Yi's per-ability factors {1, 1/2, …, 1/64}) and cap every tag at
   `max_per_tag` rows (default: the median tag's size), so no ability dominates.

Decisions where the spec is silent or marked inferred (tested in tests/methods/test_curate.py):
- MinHash and LSH are written here (~30 lines) because `datasketch` is not installed; the hash is a stable
  universal hash (a·crc32 + b mod a prime > 2³²), the same in every process (Python's str hash is salted).
  Bands of 4 rows (32 bands for 128 permutations) make almost every pair above 0.5 a candidate, and the
  candidates are accepted on their estimated Jaccard (the share of equal signature entries).
- Shingles are word 3-grams, not characters: on the bundled sets' short templated rows ("Which element has
  the chemical symbol Au? Gold" vs "... Sn? Tin") 5-character shingles reach Jaccard 0.8 between different facts
  (4 of factual_qa's 500 rows dropped at 0.8), word 3-grams none (0 of 500, 0 of arithmetic's 2000 at 0.8).
- Greedy near-duplicate removal (a row is dropped only for a *kept* earlier row), not union-find: a chain
  A≈B≈C with A≉C keeps A and C.
- Per-row statistics (lengths, pattern, repetition share, signature) are computed on Ray Data
  (map_batches); the driver reads only those small columns, decides, and gathers the kept rows in order.
- Not automatable here: Yi's intro/body/conclusion style, the step-back CoT pattern, WizardLM prompt
  evolution, and "knowledge the base model lacks" (needs the model; see the data methods that score it).
  Tags are not invented: `balance_by` names a column the data already has (e.g. `source`, `category`).
"""

from __future__ import annotations

import re
import zlib
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from ftray.data.errors import DataError
from ftray.data.selection import preview, prompt_and_response, take_rows
from ftray.methods.base import Context, Method, MethodConfig, stable_seed
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

PRIME = 4294967311  # the smallest prime above 2³²: a·x + b stays below 2⁶⁴ for 32-bit a, x, b
LSH_ROWS = 4  # signature rows per LSH band


class CurateConfig(MethodConfig):
    min_response_chars: int = Field(1, ge=0, description="Length filter: drop rows whose response has fewer characters.")
    max_response_chars: int | None = Field(None, ge=1, description="Length filter: drop rows whose response is longer; null = no bound.")
    max_prompt_chars: int | None = Field(None, ge=1, description="Length filter: drop rows whose prompt is longer; null = no bound.")
    response_pattern: str | None = Field(None, description="Format filter: a regular expression (re.search) every response "
                                         "must match, e.g. 'The answer is' for CoT; null = off.")
    repetition_ngram: int = Field(3, ge=1, description="Repetition filter: n of the word n-grams compared.")
    max_repeated_ngram_share: float | None = Field(0.3, gt=0, le=1, description="Repetition filter: drop a response when "
                                                   "more than this share of its word n-grams repeat an earlier one; null = off.")
    dedup_threshold: float | None = Field(0.8, gt=0, le=1, description="Near-duplicate filter: drop a row whose text has "
                                          "Jaccard similarity ≥ this with a row kept before it; null = off.")
    dedup_on: Literal["prompt", "response", "both"] = Field("both", description="Near-duplicate filter: compare the "
                                                           "prompts, the responses, or both joined.")
    shingle_words: int = Field(3, ge=1, description="Near-duplicate filter: words per shingle (lower-cased word tokens; "
                               "case, spacing and punctuation do not count).")
    num_perm: int = Field(128, ge=LSH_ROWS, multiple_of=LSH_ROWS, description="Near-duplicate filter: MinHash permutations "
                          "(bands of 4); more = a finer Jaccard estimate.")
    balance_by: str | None = Field(None, description="Tag balance: a column tagging each row's task, topic or capability "
                                   "(e.g. 'source', 'category'); null = off.")
    tag_rates: dict[str, float] = Field(default_factory=dict, description="Tag balance: fraction of each tag's rows kept "
                                        "(Yi's grid: 1, 1/2, …, 1/64); tags not named keep 1.")
    max_per_tag: int | None = Field(None, ge=1, description="Tag balance: rows kept per tag at most; null = the median tag's size.")


def words(text: str) -> list[str]:
    """Lower-cased word tokens (runs of letters/digits): case, spacing and punctuation do not count."""
    return re.findall(r"\w+", text.lower())


def repeated_ngram_share(text: str, n: int) -> float:
    """Share of the word n-grams of `text` that repeat an n-gram seen earlier in it (0 = none, → 1 = one loop)."""
    w = words(text)
    grams = [tuple(w[i:i + n]) for i in range(len(w) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def hash_params(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    """The universal hashes' (a, b), fixed by a constant seed: the same signatures in every run and process."""
    rng = np.random.default_rng(20240304)
    return rng.integers(1, 2**32 - 1, num_perm, dtype=np.uint64), rng.integers(0, 2**32 - 1, num_perm, dtype=np.uint64)


def minhash(text: str, n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """MinHash signature of the set of word `n`-gram shingles of `text` (uint32, one entry per permutation)."""
    w = words(text)
    shingles = {" ".join(w[i:i + n]) for i in range(max(1, len(w) - n + 1))}
    x = np.fromiter((zlib.crc32(s.encode()) for s in shingles), dtype=np.uint64, count=len(shingles))
    return ((np.outer(x, a) + b) % PRIME).min(axis=0).astype(np.uint32)


def near_duplicates(signatures: np.ndarray, order: list[int], threshold: float) -> dict[int, int]:
    """{dropped row: the kept row it duplicates}, scanning rows in `order` and comparing with kept rows only."""
    bands = signatures.shape[1] // LSH_ROWS
    buckets: list[dict[bytes, list[int]]] = [{} for _ in range(bands)]
    dropped: dict[int, int] = {}
    for i in order:
        keys = [signatures[i, j * LSH_ROWS:(j + 1) * LSH_ROWS].tobytes() for j in range(bands)]
        seen: set[int] = set()
        for j, key in enumerate(keys):
            for kept in buckets[j].get(key, ()):
                if kept not in seen and (signatures[kept] == signatures[i]).mean() >= threshold:
                    dropped[i] = kept
                    break
                seen.add(kept)
            if i in dropped:
                break
        if i not in dropped:
            for j, key in enumerate(keys):
                buckets[j].setdefault(key, []).append(i)
    return dropped


def row_stats(batch: pa.Table, cfg: CurateConfig) -> pa.Table:
    """The per-row columns the filters decide on (Ray Data map_batches; the rows stay where they are)."""
    a, b = hash_params(cfg.num_perm)
    pattern = re.compile(cfg.response_pattern) if cfg.response_pattern else None
    cols: dict[str, list] = {"prompt_chars": [], "response_chars": [], "pattern_ok": [], "repeated": [], "signature": []}
    for row in batch.to_pylist():
        prompt, response = prompt_and_response(row)
        cols["prompt_chars"].append(len(prompt))
        cols["response_chars"].append(len(response.strip()))
        cols["pattern_ok"].append(bool(pattern.search(response)) if pattern else True)
        cols["repeated"].append(repeated_ngram_share(response, cfg.repetition_ngram))
        if cfg.dedup_threshold is not None:
            text = {"prompt": prompt, "response": response, "both": f"{prompt}\n{response}"}[cfg.dedup_on]
            cols["signature"].append(minhash(text, cfg.shingle_words, a, b).tolist())
        else:
            cols["signature"].append([])
    return pa.table({**{k: v for k, v in cols.items() if k != "signature"},
                     "signature": pa.array(cols["signature"], pa.list_(pa.uint32()))})


def balance(tags: list[str], rows: list[int], cfg: CurateConfig, seed: int) -> tuple[list[int], dict[str, int]]:
    """The rows kept by tag balance (in order), and the cap used per tag."""
    groups: dict[str, list[int]] = {}
    for i in rows:
        groups.setdefault(tags[i], []).append(i)
    unknown = set(cfg.tag_rates) - set(groups)
    if unknown:
        raise DataError(f"curate.tag_rates: no rows tagged {', '.join(sorted(unknown))}; tags: {', '.join(groups)}")
    cap = cfg.max_per_tag or int(np.median([len(g) for g in groups.values()]))
    rng = np.random.default_rng(seed)
    keep, caps = [], {}
    for tag, members in groups.items():
        caps[tag] = min(cap, int(np.floor(cfg.tag_rates.get(tag, 1.0) * len(members) + 0.5)))
        keep += rng.choice(members, caps[tag], replace=False).tolist() if caps[tag] < len(members) else members
    return sorted(keep), caps


@register
class Curate(Method):
    """Yi's SFT curation rules as filters: length, format, repetition, near-duplicates, tag balance."""

    name = "curate"
    paper = "01.AI, Yi: Open Foundation Models by 01.AI (2403.04652), §4 fine-tuning data"
    Config = CurateConfig
    # a 2000-row arithmetic pool with injected near-duplicates (50 problems × 9 variants) and looping rationales
    # (one sentence ten times); the baseline trains on the whole pool
    bench = {"data": {"source": "bundled:arithmetic_dirty", "eval_source": "bundled:arithmetic"}}

    def check(self, spec: RunSpec) -> None:
        if self.config.response_pattern:
            try:
                re.compile(self.config.response_pattern)
            except re.error as e:
                raise ValueError(f"response_pattern is not a regular expression: {e}") from None
        if self.config.tag_rates and not self.config.balance_by:
            raise ValueError("tag_rates needs balance_by: the column that holds the tags")

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        import ray

        cfg = self.config
        ds = ds.materialize()  # the positions below index this order
        if cfg.balance_by and cfg.balance_by not in ds.columns():
            raise DataError(f"curate.balance_by: the training rows have no column {cfg.balance_by!r}; columns: {', '.join(ds.columns())}")
        stats = ds.map_batches(row_stats, fn_kwargs={"cfg": cfg}, batch_format="pyarrow")
        s = pa.concat_tables(ray.get(stats.to_arrow_refs()))  # small columns only, in the rows' order
        n = s.num_rows
        reasons: dict[int, str] = {}
        resp, prompt = s["response_chars"].to_numpy(), s["prompt_chars"].to_numpy()
        bad_length = resp < cfg.min_response_chars
        if cfg.max_response_chars:
            bad_length |= resp > cfg.max_response_chars
        if cfg.max_prompt_chars:
            bad_length |= prompt > cfg.max_prompt_chars
        for i in np.flatnonzero(bad_length):
            reasons[int(i)] = "length"
        for i in np.flatnonzero(~s["pattern_ok"].to_numpy(zero_copy_only=False)):
            reasons.setdefault(int(i), "format")
        if cfg.max_repeated_ngram_share is not None:
            for i in np.flatnonzero(s["repeated"].to_numpy() > cfg.max_repeated_ngram_share):
                reasons.setdefault(int(i), "repetition")
        duplicate_of: dict[int, int] = {}
        if cfg.dedup_threshold is not None:
            sig = np.asarray(s["signature"].to_pylist(), dtype=np.uint32)
            duplicate_of = near_duplicates(sig, [i for i in range(n) if i not in reasons], cfg.dedup_threshold)
            reasons |= dict.fromkeys(duplicate_of, "near_duplicate")
        keep = [i for i in range(n) if i not in reasons]
        caps = None
        if cfg.balance_by:
            tags = [str(r[cfg.balance_by]) for r in ds.select_columns([cfg.balance_by]).take_all()]
            kept, caps = balance(tags, keep, cfg, stable_seed("curate", ctx.spec.train.seed))
            reasons |= dict.fromkeys(sorted(set(keep) - set(kept)), "tag_balance")
            keep = kept
        out = take_rows(ds, keep)
        counts = {r: 0 for r in ("length", "format", "repetition", "near_duplicate", "tag_balance")}
        for r in reasons.values():
            counts[r] += 1
        ctx.report.update({"rows_in": n, **{f"dropped_{k}": v for k, v in counts.items()}, **({"tag_caps": caps} if caps else {})})
        ctx.report["examples"] = self._examples(ds, reasons, duplicate_of)
        return out

    @staticmethod
    def _examples(ds: Any, reasons: dict[int, str], duplicate_of: dict[int, int]) -> list[str]:
        """Up to five dropped rows, one per reason first, each with why."""
        firsts: dict[str, int] = {}
        for i, r in sorted(reasons.items()):
            firsts.setdefault(r, i)
        picks = (list(firsts.values()) + [i for i in sorted(reasons) if i not in firsts.values()])[:5]
        rows = take_rows(ds, picks).take_all() if picks else []
        return [f"[{reasons[i]}{f' of row {duplicate_of[i]}' if i in duplicate_of else ''}] row {i}: {preview(r)}"
                for i, r in zip(picks, rows)]
