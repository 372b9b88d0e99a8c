"""KnowAda: the unknown rule, captions rewritten by exactly their unknown facts, rule DNLI, and the Ray Data probe."""

import datasets
import pytest
import yaml

from ftray.config import build_spec
from ftray.data import load_rows
from ftray.methods import build_methods
from ftray.methods.knowada import (
    KnowAdaConfig, adapt, caption_metrics, caption_of, dnli, is_unknown, load_judge, parse_caption, questions_of,
    rewrite_facts, rule_judge, scene_facts, unique_scenes,
)
from ftray.tasks import get_task
from tests.methods.helpers import prepare


def _scenes(n: int) -> tuple[list[dict], list[dict]]:
    scenes = unique_scenes(load_rows("bundled:shapes_vqa", "train", n).to_list())
    return scenes, [scene_facts(s["objects"]) for s in scenes]


def _answers(facts: list[dict], c: KnowAdaConfig, wrong: set[tuple[int, int]] = frozenset(), n_wrong: int = 10) -> dict:
    """Every question answered right 10 times, except the `wrong` (scene, question) ones: `n_wrong` of them wrong."""
    out = {}
    for i, f in enumerate(facts):
        for k, q in enumerate(questions_of(f, c.questions_per_image)):
            bad = n_wrong if (i, k) in wrong else 0
            out[(i, k)] = ["I cannot tell"] * bad + [q["answer"]] * (c.answers_per_question - bad)
    return out


def test_unknown_rule_is_at_least_8_of_10_judgments_below_2():
    assert is_unknown([1] * 8 + [3] * 2, 8)
    assert is_unknown([1] * 10, 8)
    assert not is_unknown([1] * 7 + [3] * 3, 8)
    assert not is_unknown([1] * 7 + [2] * 3, 8)  # 2 (partially right) is not below 2
    c = KnowAdaConfig()
    scenes, facts = _scenes(1)
    for n_wrong, unknown in ((8, 1), (7, 0)):
        _, report = adapt(scenes, facts, _answers(facts, c, {(0, 0)}, n_wrong), c)
        assert report["unknown_per_type"]["count"] == unknown


def test_rule_judge_scores_exact_partial_and_wrong():
    colour = {"type": "colour", "answer": "red"}
    assert [rule_judge(colour, r) for r in ("Red.", "red and blue", "blue", "")] == [3, 2, 1, 1]
    kind = {"type": "kind", "answer": "square"}
    assert [rule_judge(kind, r) for r in ("a square", "a rectangle", "a circle")] == [3, 2, 1]
    where = {"type": "position", "answer": "top left"}
    assert [rule_judge(where, r) for r in ("In the top left corner.", "upper left", "top right", "bottom right", "?")] == [3, 3, 2, 1, 1]
    assert rule_judge({"type": "position", "answer": "center"}, "in the middle") == 3
    count = {"type": "count", "answer": "3"}
    assert [rule_judge(count, r) for r in ("3", "three shapes", "4", "7", "many")] == [3, 3, 2, 1, 1]
    assert load_judge("rules") is rule_judge
    assert load_judge("ftray.methods.knowada:rule_judge") is rule_judge
    with pytest.raises(ValueError, match="knowada.judge"):
        load_judge("no_such_module:judge")


def test_captions_with_no_unknown_question_are_unchanged():
    c = KnowAdaConfig()
    scenes, facts = _scenes(20)
    rows, report = adapt(scenes, facts, _answers(facts, c), c)
    assert [r["messages"][1]["content"][0]["text"] for r in rows] == [caption_of(f) for f in facts]
    assert report["captions_rewritten"] == 0 and report["sentences_dropped"] == 0 and sum(report["unknown_per_type"].values()) == 0
    assert caption_of(scene_facts([{"kind": "circle", "colour": "red", "cell": 0}])) == "There is 1 shape. A red circle in the top left."


@pytest.mark.parametrize("kind_unknown", ["soften", "drop_sentence"])
def test_rewriting_drops_exactly_the_facts_behind_unknown_questions(kind_unknown):
    c = KnowAdaConfig(kind_unknown=kind_unknown)
    scenes, facts = _scenes(30)
    wrong = {(i, k) for i, f in enumerate(facts) for k in range(len(questions_of(f, 10))) if (3 * i + k) % 4 == 0}
    rows, report = adapt(scenes, facts, _answers(facts, c, wrong), c)
    assert report["captions_rewritten"] > 0 and len(report["examples"]) == 2
    for i, (f, row) in enumerate(zip(facts, rows)):
        qs = questions_of(f, 10)
        unknown = [q for k, q in enumerate(qs) if (i, k) in wrong]
        assert row["unknown_questions"] == [q["question"] for q in unknown]
        before, after = parse_caption(row["caption_original"]), parse_caption(row["messages"][1]["content"][0]["text"])
        assert before["count"] == f["count"] and before["mentions"] == f["objects"]  # the parser reads captions back exactly
        assert after["count"] == (None if any(q["type"] == "count" for q in unknown) else f["count"])
        expected = []
        for j, obj in enumerate(f["objects"]):
            lost = {q["type"] for q in unknown if q["object"] == j}
            if kind_unknown == "drop_sentence" and "kind" in lost:
                lost = {"kind", "colour", "position"}
            kept = {a: (None if a in lost else v) for a, v in obj.items()}
            if any(kept.values()):
                expected.append(kept)
        assert after["mentions"] == expected


def test_dnli_on_identical_captions_and_on_a_contradiction():
    objects = [{"kind": "circle", "colour": "red", "cell": 0}, {"kind": "square", "colour": "blue", "cell": 4}]
    same = dnli(caption_of(scene_facts(objects)), objects)
    assert same["contradiction_precision"] == 0 and same["descriptiveness_precision"] == 1 and same["descriptiveness_recall"] == 1
    assert same["propositions"] == same["reference_propositions"] == 7
    wrong = dnli("There are 2 shapes. A green circle in the top left.", objects)  # colour wrong, the square left out
    assert wrong["propositions"] == 4 and wrong["contradicted"] == 1
    assert wrong["descriptiveness_recall"] == pytest.approx(3 / 7) and wrong["contradiction_precision"] == pytest.approx(1 / 4)
    assert dnli("", objects)["descriptiveness_recall"] == 0


def test_config_refuses_a_threshold_above_the_answers():
    with pytest.raises(ValueError, match="difficulty_threshold"):
        KnowAdaConfig(answers_per_question=5, difficulty_threshold=8)


def test_prepare_data_probes_the_tiny_llava_on_ray_and_gives_caption_rows(tiny_llava_dir, tiny_tokenizer, ray_local, tmp_path):
    rows = load_rows("bundled:shapes_vqa", "train", 3).to_list()
    rows.append({**rows[0], "answer": "other"})  # a second row of the same scene is captioned once
    entry = {"name": "knowada", "questions_per_image": 3, "answers_per_question": 4, "difficulty_threshold": 3, "max_new_tokens": 4}
    spec = build_spec({"model": {"name": str(tiny_llava_dir)}, "task": {"type": "vision_language"}, "methods": [entry],
                       "data": {"source": "bundled:shapes_vqa", "max_len": 256, "actors": 1, "actor_threads": 1}})
    (method,) = build_methods(spec.methods)
    out, report = prepare(method, rows, spec, tiny_tokenizer)
    assert len(out) == 3 and report["captions_in"] == 3 and sum(report["questions_per_type"].values()) == 9
    facts = [scene_facts(r["objects"]) for r in rows[:3]]
    assert [r["caption_original"] for r in out] == [caption_of(f) for f in facts]
    for r, f in zip(out, facts):  # the caption is the scene's minus exactly its unknown questions' facts
        unknown = [q for q in questions_of(f, 3) if q["question"] in r["unknown_questions"]]
        assert r["messages"][1]["content"][0]["text"] == caption_of(rewrite_facts(f, unknown))
    assert get_task(spec).tokenize(datasets.Dataset.from_list(out), tiny_tokenizer, "knowada rows")

    final = tmp_path / "final"  # caption_metrics on a checkpoint dir: the tiny LLaVA with its run spec
    final.mkdir()
    for p in tiny_llava_dir.iterdir():
        (final / p.name).write_bytes(p.read_bytes())
    (final / "ftray_spec.yaml").write_text(yaml.safe_dump(spec.model_dump(mode="json")))
    scores = caption_metrics(str(final), 2, tmp_path)
    assert scores["captions"] == 2 and 0 <= scores["dnli_contradiction_precision"] <= 1 and 0 <= scores["dnli_descriptiveness_recall"] <= 1
