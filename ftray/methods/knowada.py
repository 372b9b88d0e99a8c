"""KnowAda — knowledge-adapted captions (Yanuka, Ben Kish, Bitton, Szpektor, Giryes; "Bridging the Visual Gap:
Fine-Tuning Multimodal Models with Knowledge-Adapted Captions", NAACL 2025, 2411.09018).

Idea: before caption SFT, probe the target VLM with questions about each dense caption's details and rewrite
the caption so it drops or softens what the model does not know. Training on captions that the model can
ground lowers hallucination (DNLI contradictions) at a small cost in descriptiveness.

    task: {type: vision_language}
    methods: [{name: knowada}]       # rows: bundled:shapes_vqa (each keeps its scene's `objects`)

The pipeline, run once per target VLM in `prepare_data` (the paper's `run.py` steps (i)–(v)):
1. one dense caption per scene, one sentence per object ("There are 2 shapes. A red circle in the top left.
   A blue square in the center."), built from the row's `objects`; rows that share an image count once;
2. up to `questions_per_image` questions about the caption's facts (count, colour, kind, position);
3. the target VLM answers each `answers_per_question` times at `temperature` (VLMAnswerer on Ray Data);
4. a judge scores each answer 1–3 against the caption fact; a question is unknown when at least
   `difficulty_threshold` of its answers score below 2;
5. the caption is re-rendered without the facts behind its unknown questions; the training row is
   {images, messages: [user: <image> prompt, assistant: caption]}.
`caption_metrics` (a `bench_metrics` entry) measures DNLI-style contradiction / descriptiveness of the
captions a checkpoint generates on the test scenes, with propositions and judgments made by rules.

Decisions ([inf]; the paper uses Gemini for questions, judge and rewrite, which ftray cannot call):
- Captions, questions, judge and rewriter are scripted from the scene objects, so the facts behind a
  question are exact and a rewrite is checkable. The count is a fact of its own (the caption's first
  sentence), so an unknown count question has a sentence to drop.
- Questions, in order (the cut at `questions_per_image` removes positions first): the count, each object's
  colour ("What colour is the circle in the top left?"), its kind ("What shape is in the top left?"), its
  position ("Where is the red circle?", only when that colour+kind pair is unique in the scene). The
  question is followed by `answer_hint` to keep replies short; `max_new_tokens` is 16, not the paper's
  100, since every answer here is a few words.
- Judge (`judge: rules`): 3 = only the right value; 2 = partially right (the right value among others, a
  near word such as "rectangle" for a square, one of the two position words right, a count off by one);
  1 = wrong or no value. Any `package.module:function(question, reply) -> 1..3` can replace it.
- Rewrite: an unknown colour or position is left out of its sentence ("A circle in the top left."); an
  unknown kind becomes "shape" (`kind_unknown: soften`) or drops the whole sentence (`drop_sentence`); a
  sentence with nothing known left is dropped; an unknown count drops the count sentence. Captions
  with no unknown question are rendered by the same function, so they are unchanged.
- DNLI by rules: a caption's propositions are its count claim and each mentioned object's kind / colour /
  position; each mention is matched to the unmatched reference object it agrees with most, and each claim
  is entailed when it equals that object's value (a partial position such as "top" when its words
  agree), else contradicted. Precision and recall are per caption, then averaged over captions; an empty
  caption has precision 0 and contradiction 0.
- `rewrite: false` keeps every caption unchanged (the paper's dense-caption baseline) while still probing
  and reporting, so a baseline run trains on the same rows minus the adaptation.
"""

from __future__ import annotations

import importlib
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

from pydantic import Field, model_validator

from ftray.data.bundled.shapes_vqa import COLOURS as _COLOUR_RGB
from ftray.data.bundled.shapes_vqa import COLS, KINDS, ROWS, position
from ftray.methods.base import Context, Method, MethodConfig
from ftray.methods.registry import register

if TYPE_CHECKING:
    import ray.data

    from ftray.config import RunSpec

COLOURS = tuple(_COLOUR_RGB)
QTYPES = ("count", "colour", "kind", "position")
ATTRS = ("kind", "colour", "position")
PROMPT = "Describe the image in detail."
# reply words → the value they name: exact words, and near words that are only partly right
_KIND_EXACT = {**{k: k for k in KINDS}, **{k + "s": k for k in KINDS}}
_KIND_NEAR = {"round": "circle", "disc": "circle", "disk": "circle", "dot": "circle", "ball": "circle", "oval": "circle",
              "ellipse": "circle", "ring": "circle", "rectangle": "square", "box": "square", "block": "square", "cube": "square",
              "triangular": "triangle", "pyramid": "triangle", "wedge": "triangle"}
_ROW_WORDS = {"top": "top", "upper": "top", "middle": "middle", "center": "middle", "centre": "middle", "bottom": "bottom", "lower": "bottom"}
_COL_WORDS = {"left": "left", "center": "center", "centre": "center", "middle": "center", "right": "right"}
_NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}

Judge = Callable[[dict, str], int]


# ---- facts, captions, questions ---------------------------------------------------------------------------

def scene_facts(objects: list[dict]) -> dict:
    """{count, objects: [{kind, colour, position}]} of a shapes_vqa scene, objects in grid order."""
    objs = sorted(objects, key=lambda o: o["cell"])
    return {"count": len(objs), "objects": [{"kind": o["kind"], "colour": o["colour"], "position": position(o["cell"])} for o in objs]}


def _article(words: str) -> str:
    return "An" if words[:1] in "aeiou" else "A"


def object_sentence(obj: dict) -> str | None:
    """"A red circle in the top left." from the known attributes (None for unknown); None when none is known."""
    if not any(obj.get(a) for a in ATTRS):
        return None
    words = " ".join(w for w in (obj.get("colour"), obj.get("kind") or "shape") if w)
    where = f" in the {obj['position']}" if obj.get("position") else ""
    return f"{_article(words)} {words}{where}."


def caption_of(facts: dict) -> str:
    """The dense caption of `facts`: the count sentence, then one sentence per object with something known."""
    n = facts.get("count")
    head = [] if n is None else [f"There is {n} shape." if n == 1 else f"There are {n} shapes."]
    return " ".join(head + [s for o in facts["objects"] if (s := object_sentence(o))])


def questions_of(facts: dict, limit: int) -> list[dict]:
    """Up to `limit` questions {type, object, question, answer} about the caption's facts (object -1: the scene)."""
    objs = facts["objects"]
    pairs = [(o["colour"], o["kind"]) for o in objs]
    qs = [{"type": "count", "object": -1, "question": "How many shapes are there?", "answer": str(facts["count"])}]
    qs += [{"type": "colour", "object": i, "question": f"What colour is the {o['kind']} in the {o['position']}?", "answer": o["colour"]}
           for i, o in enumerate(objs)]
    qs += [{"type": "kind", "object": i, "question": f"What shape is in the {o['position']}?", "answer": o["kind"]}
           for i, o in enumerate(objs)]
    qs += [{"type": "position", "object": i, "question": f"Where is the {o['colour']} {o['kind']}?", "answer": o["position"]}
           for i, o in enumerate(objs) if pairs.count((o["colour"], o["kind"])) == 1]
    return qs[:limit]


def rewrite_facts(facts: dict, unknown: list[dict], kind_unknown: str = "soften") -> dict:
    """`facts` without the facts behind the `unknown` questions (an unknown kind with drop_sentence: the whole object)."""
    out = {"count": facts["count"], "objects": [dict(o) for o in facts["objects"]]}
    for q in unknown:
        if q["type"] == "count":
            out["count"] = None
            continue
        obj = out["objects"][q["object"]]
        if q["type"] == "kind" and kind_unknown == "drop_sentence":
            obj.update(dict.fromkeys(ATTRS))
        else:
            obj[q["type"]] = None
    return out


# ---- reading replies and captions -------------------------------------------------------------------------

def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+|\d+", text.lower())


def parse_position(text: str) -> tuple[str | None, str | None] | None:
    """The first grid position named in `text` as (row, col), a part None when not said ("left" → (None, 'left'))."""
    w = _words(text)
    for i, word in enumerate(w):
        nxt = w[i + 1] if i + 1 < len(w) else ""
        if word in _ROW_WORDS and nxt in _COL_WORDS:
            return _ROW_WORDS[word], _COL_WORDS[nxt]
        if word in _COL_WORDS and nxt in ("top", "upper", "bottom", "lower"):
            return _ROW_WORDS[nxt], _COL_WORDS[word]
        if word in ("center", "centre", "middle"):
            return "middle", "center"
        if word in _ROW_WORDS:
            return _ROW_WORDS[word], None
        if word in _COL_WORDS:
            return None, _COL_WORDS[word]
    return None


def position_words(pos: tuple[str | None, str | None]) -> str:
    """(row, col) → the caption's words ('top left', 'center'; a partial position keeps its one word)."""
    row, col = pos
    if row and col:
        return position(ROWS.index(row) * len(COLS) + COLS.index(col))
    return row or col or ""


def parse_count(text: str) -> int | None:
    """The first number in `text`, as digits or a word up to ten."""
    for word in _words(text):
        if word.isdigit():
            return int(word)
        if word in _NUMBERS:
            return _NUMBERS[word]
    return None


def _named(text: str, exact: dict[str, str], near: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    w = _words(text)
    return [exact[x] for x in w if x in exact], [near[x] for x in w if near and x in near]


def rule_judge(question: dict, reply: str) -> int:
    """Score a reply to a question 1–3 against the caption fact (3 exact, 2 partially right, 1 wrong)."""
    kind, truth = question["type"], question["answer"]
    if kind == "count":
        n, want = parse_count(reply), int(truth)
        return 1 if n is None else 3 if n == want else 2 if abs(n - want) == 1 else 1
    if kind == "position":
        got, want = parse_position(reply), parse_position(truth)
        if got is None:
            return 1
        if got == want:
            return 3
        return 2 if any(g is not None and g == t for g, t in zip(got, want)) else 1
    exact, near = _named(reply, {c: c for c in COLOURS} if kind == "colour" else _KIND_EXACT, None if kind == "colour" else _KIND_NEAR)
    if set(exact) == {truth}:
        return 3
    return 2 if truth in exact or truth in near else 1


def load_judge(name: str) -> Judge:
    """'rules' → `rule_judge`; 'package.module:function' → that function (question dict, reply) -> 1..3."""
    if name == "rules":
        return rule_judge
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"knowada.judge: {name!r} is neither 'rules' nor 'package.module:function'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"knowada.judge: cannot load {name!r} ({err}); give 'rules' or an importable 'package.module:function'") from None


def is_unknown(scores: list[int], threshold: int) -> bool:
    """The paper's rule: a question is unknown when at least `threshold` of its answers score below 2."""
    return sum(s < 2 for s in scores) >= threshold


def parse_caption(text: str) -> dict:
    """{count, mentions: [{kind, colour, position}]} claimed by a caption (None where a mention says nothing)."""
    count, mentions = None, []
    for seg in re.split(r"[.;:!?\n,]|\band\b", text.lower()):
        if re.search(r"\bthere (?:is|are)\b.*\bshapes?\b", seg):
            count = parse_count(seg) if count is None else count
            continue
        colours, _ = _named(seg, {c: c for c in COLOURS})
        kinds, _ = _named(seg, _KIND_EXACT)
        pos = parse_position(seg)
        m = {"kind": kinds[0] if kinds else None, "colour": colours[0] if colours else None,
             "position": position_words(pos) if pos else None}
        if any(m.values()):
            mentions.append(m)
    return {"count": count, "mentions": mentions}


def _agrees(attr: str, claim: str, truth: str) -> bool:
    if attr != "position":
        return claim == truth
    got, want = parse_position(claim), parse_position(truth)
    return got is not None and all(g is None or g == t for g, t in zip(got, want))


def dnli(generated: str, reference_objects: list[dict]) -> dict:
    """DNLI-style scores of a caption against its scene: contradiction precision, descriptiveness precision/recall."""
    ref = scene_facts(reference_objects)
    gen = parse_caption(generated)
    n_gen = entailed = 0
    hit: set[tuple] = set()  # reference propositions entailed: ("count",) or (object, attr)
    if gen["count"] is not None:
        n_gen += 1
        if gen["count"] == ref["count"]:
            entailed += 1
            hit.add(("count",))
    free = list(range(len(ref["objects"])))
    for m in gen["mentions"]:
        claims = {a: v for a, v in m.items() if v}
        n_gen += len(claims)
        if not free:
            continue  # more objects claimed than the scene has: every claim is contradicted
        best = max(free, key=lambda i: (sum(_agrees(a, v, ref["objects"][i][a]) for a, v in claims.items()), -i))
        free.remove(best)
        for a, v in claims.items():
            if _agrees(a, v, ref["objects"][best][a]):
                entailed += 1
                hit.add((best, a))
    n_ref = 1 + len(ATTRS) * len(ref["objects"])
    return {"propositions": n_gen, "reference_propositions": n_ref, "entailed": entailed, "contradicted": n_gen - entailed,
            "contradiction_precision": (n_gen - entailed) / n_gen if n_gen else 0.0,
            "descriptiveness_precision": entailed / n_gen if n_gen else 0.0, "descriptiveness_recall": len(hit) / n_ref}


# ---- rows ------------------------------------------------------------------------------------------------

def caption_row(images: list, caption: str, prompt: str = PROMPT) -> dict:
    """A caption SFT row {images, messages}."""
    return {"images": list(images), "messages": [
        {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": prompt}]},
        {"role": "assistant", "content": [{"type": "text", "text": caption}]}]}


def _image_key(image: Any) -> str:
    if isinstance(image, dict):
        return image.get("path") or str(hash(image.get("bytes")))
    return str(image)


def unique_scenes(rows: list[dict], base_dirs: list[Path] = ()) -> list[dict]:
    """{images, objects} once per distinct image list, in first-seen order; relative image paths made absolute."""
    seen, scenes = set(), []
    for i, r in enumerate(rows, 1):
        if not r.get("objects"):
            raise ValueError(f"knowada: training row {i} has no `objects` (kind, colour, cell per shape) to caption; "
                             "use data.source: bundled:shapes_vqa or rows that keep their scene's objects")
        key = tuple(_image_key(x) for x in r["images"])
        if key not in seen:
            seen.add(key)
            scenes.append({"images": [_absolute(x, base_dirs) for x in r["images"]], "objects": r["objects"]})
    return scenes


def _absolute(image: Any, base_dirs: list[Path]) -> Any:
    if not isinstance(image, str) or Path(image).is_absolute():
        return image
    found = next((c for c in (Path(image), *(d / image for d in base_dirs)) if c.is_file()), None)
    return str(found.resolve()) if found else image


def question_prompt(row: dict) -> tuple[list[dict], list]:
    """The VLM prompt of a question row: its one user turn and its images."""
    from ftray.tasks.vision_language import normalize_messages

    return normalize_messages(row["messages"]), list(row["images"])


class KnowAdaConfig(MethodConfig):
    questions_per_image: int = Field(10, ge=1, description="Questions asked per caption, at most (paper: about 10).")
    answers_per_question: int = Field(10, ge=1, description="Sampled answers of the target VLM per question (paper: 10).")
    temperature: float = Field(0.4, gt=0, description="Sampling temperature of the answers (paper: 0.4).")
    difficulty_threshold: int = Field(8, ge=1, description="A question is unknown when at least this many of its answers "
                                      "score below 2 (paper: 8 of 10); higher keeps more detail, lower drops more.")
    max_new_tokens: int = Field(16, ge=1, description="Tokens generated per answer (short answers; the paper's 100 fits free text).")
    answer_hint: str = Field("Answer in a few words.", description="Text after each probing question, to keep answers short.")
    judge: str = Field("rules", description="Answer judge: 'rules' (the local rule judge) or 'package.module:function' "
                       "taking (question dict {type, question, answer}, reply) and returning 1 (wrong) to 3 (exact).")
    kind_unknown: Literal["soften", "drop_sentence"] = Field(
        "soften", description="Rewrite of an object whose kind is unknown: call it a 'shape' (soften) or drop its sentence.")
    rewrite: bool = Field(True, description="Rewrite captions; false keeps the dense captions (the un-adapted baseline, still probed).")
    prompt: str = Field(PROMPT, description="The user turn of the caption rows (and of caption_metrics).")

    @model_validator(mode="after")
    def _threshold_fits(self) -> KnowAdaConfig:
        if self.difficulty_threshold > self.answers_per_question:
            raise ValueError(f"difficulty_threshold={self.difficulty_threshold} exceeds answers_per_question="
                             f"{self.answers_per_question}, so no question could be unknown; lower it")
        return self


@register
class KnowAda(Method):
    """Dense captions rewritten to drop the details the target VLM answers wrongly, then caption SFT."""

    name = "knowada"
    paper = "Yanuka et al. 2025, Bridging the Visual Gap: Fine-Tuning Multimodal Models with Knowledge-Adapted Captions (KnowAda), NAACL (2411.09018)"
    Config = KnowAdaConfig
    tasks = ("vision_language",)
    # the bench's VLM (`ftray bench methods --vlm-model`, the tiny random LLaVA by default; SmolVLM needs
    # max_len 1024): 200 scenes × ≤10 questions × 10 answers, one-thread inference actors on shared CPUs
    bench = {"task": {"type": "vision_language", "vlm": {"vision_tower": "full", "projector": "full", "language_model": "full"}},
             "data": {"source": "bundled:shapes_vqa", "max_len": 192, "max_samples": 200, "actor_threads": 1},
             "train": {"lr": 1e-3, "max_steps": 400}}
    bench_metrics = ("ftray.methods.knowada:caption_metrics",)
    bench_baseline = [{"name": "knowada", "rewrite": False}]  # the paper's baseline: SFT on the same dense captions

    def check(self, spec: RunSpec) -> None:
        """The judge must load before Ray starts."""
        load_judge(self.config.judge)

    def prepare_data(self, ds: ray.data.Dataset, ctx: Context) -> ray.data.Dataset:
        """Probe the VLM with questions about each scene's caption (Ray Data), judge, rewrite, return caption rows."""
        import ray.data

        from ftray.data.inference import map_model
        from ftray.data.vlm_inference import VLMAnswerer

        c = self.config
        if "objects" not in ds.columns():
            raise ValueError(f"knowada: the training rows have no `objects` column (columns: {ds.columns()}); "
                             "use data.source: bundled:shapes_vqa or rows that keep their scene's objects")
        d = ctx.spec.data
        base_dirs = [Path(s).expanduser().parent for s in (d.source,) if s and not s.startswith("bundled:")]
        scenes = unique_scenes(ds.select_columns(["images", "objects"]).take_all(), base_dirs)
        facts = [scene_facts(s["objects"]) for s in scenes]
        asks = [{"scene": i, "qid": k, "images": s["images"], "messages": [{"role": "user", "content": [
                    {"type": "image", "text": None}, {"type": "text", "text": f"{q['question']} {c.answer_hint}".strip()}]}]}
                for i, (s, f) in enumerate(zip(scenes, facts)) for k, q in enumerate(questions_of(f, c.questions_per_image))]
        answered = map_model(ray.data.from_items(asks), VLMAnswerer, ctx, num_samples=c.answers_per_question,
                             temperature=c.temperature, max_new_tokens=c.max_new_tokens, prompt_of=question_prompt)
        answers = {(r["scene"], r["qid"]): list(r["answers"]) for r in answered.select_columns(["scene", "qid", "answers"]).take_all()}
        rows, report = adapt(scenes, facts, answers, c)
        ctx.report.update(report)
        return ray.data.from_items(rows)


def adapt(scenes: list[dict], facts: list[dict], answers: dict[tuple[int, int], list[str]], c: KnowAdaConfig) -> tuple[list[dict], dict]:
    """Judge the answers, find the unknown questions, rewrite the captions; (caption rows, report)."""
    judge = load_judge(c.judge)
    rows, examples = [], []
    asked, unknown_by_type = Counter(), Counter()
    rewritten = dropped = 0
    for i, (scene, f) in enumerate(zip(scenes, facts)):
        qs = questions_of(f, c.questions_per_image)
        unknown = [q for k, q in enumerate(qs) if is_unknown([int(judge(q, a)) for a in answers[(i, k)]], c.difficulty_threshold)]
        asked.update(q["type"] for q in qs)
        unknown_by_type.update(q["type"] for q in unknown)
        before = caption_of(f)
        after = caption_of(rewrite_facts(f, unknown, c.kind_unknown)) if c.rewrite else before
        if after != before:
            rewritten += 1
            dropped += before.count(".") - after.count(".")
            if len(examples) < 2:
                examples.append({"before": before, "after": after, "unknown": [q["question"] for q in unknown]})
        rows.append({**caption_row(scene["images"], after, c.prompt), "caption_original": before,
                     "unknown_questions": [q["question"] for q in unknown]})
    report = {"captions_in": len(scenes), "captions_rewritten": rewritten, "sentences_dropped": dropped,
              "questions_per_type": {t: asked[t] for t in QTYPES}, "unknown_per_type": {t: unknown_by_type[t] for t in QTYPES},
              "examples": examples}
    return rows, report


# ---- evaluation ------------------------------------------------------------------------------------------

def caption_scores(captions: list[str], scenes_objects: list[list[dict]]) -> dict[str, float]:
    """DNLI scores averaged over captions, and the mean caption length in words."""
    per = [dnli(g, objs) for g, objs in zip(captions, scenes_objects)]
    n = max(1, len(per))
    mean = {k: round(sum(p[k] for p in per) / n, 4) for k in ("contradiction_precision", "descriptiveness_precision", "descriptiveness_recall")}
    return {f"dnli_{k}": v for k, v in mean.items()} | {"caption_words": round(sum(len(g.split()) for g in captions) / n, 2), "captions": len(per)}


def caption_metrics(final_dir: str, eval_n: int, out_dir: Path) -> dict[str, Any]:
    """Bench measurement: DNLI scores of greedy captions of the first `eval_n` test scenes of bundled:shapes_vqa."""
    import yaml

    from ftray.data import load_rows
    from ftray.tasks.vision_language import checkpoint_replies

    spec_file = Path(final_dir) / "ftray_spec.yaml"
    methods = (yaml.safe_load(spec_file.read_text()) or {}).get("methods", []) if spec_file.exists() else []
    prompt = next((m.get("prompt", PROMPT) for m in methods if isinstance(m, dict) and m.get("name") == "knowada"), PROMPT)
    scenes = unique_scenes(load_rows("bundled:shapes_vqa", "test", None).to_list())[:eval_n]
    replies = checkpoint_replies(final_dir, [caption_row(s["images"], "", prompt) for s in scenes], max_new_tokens=96)
    return caption_scores(replies, [s["objects"] for s in scenes])
