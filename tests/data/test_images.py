"""Bundled image sets (maths expressions, shape scenes) and image shifts: deterministic, consistent, loadable."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from ftray.data import DataError, load_rows
from ftray.data.bundled import IMAGE_SETS, math_images, shapes_vqa
from ftray.data.formats import row_problem
from ftray.data.images import GENERATORS, SHIFTS, image_set_path, shift_image, shift_rows


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("gen", [math_images.generate, shapes_vqa.generate])
def test_generators_are_deterministic(gen):
    a, b, c = gen(7, 6, 2), gen(7, 6, 2), gen(8, 6, 2)
    flat = lambda split: [(png(img), row) for part in split for img, row in part]  # noqa: E731
    assert flat(a) == flat(b)
    assert flat(a) != flat(c)
    assert len(a[0]) == 6 and len(a[1]) == 2


def test_math_rows_are_consistent():
    train, test = math_images.generate(3, 40, 10)
    targets = [row["latex"] for _, row in train + test]
    assert len(set(targets)) == len(targets)  # no test expression is also a train expression
    for img, row in train:
        assert img.mode == "RGB" and img.height >= 32
        tokens = row["latex"].split()
        assert tokens.count("{") == tokens.count("}")
        leaves = [t for t in tokens if t not in {"{", "}", "^", "_", "\\frac", "\\sqrt", "(", ")"}]
        assert sum(s["count"] for s in row["symbols"]) == len(leaves)
        assert row["messages"][-1]["content"][0]["text"] == row["latex"]
    fracs = [row for _, row in train if "\\frac" in row["latex"]]
    assert fracs and all(row["tree"].count("(frac") == row["latex"].count("\\frac") for row in fracs)


def test_shape_answers_follow_from_the_scene():
    train, _ = shapes_vqa.generate(5, 200, 0)
    kinds = {row["question_type"] for _, row in train}
    assert kinds == {"count", "colour_count", "colour", "position"}
    for img, row in train:
        objs, q, a = row["objects"], row["messages"][0]["content"][1]["text"], row["answer"]
        assert img.size == (shapes_vqa.SIZE, shapes_vqa.SIZE)
        if row["question_type"] == "count":
            assert a == str(len(objs))
        elif row["question_type"] == "colour_count":
            colour = re.search(r"How many (\w+) shapes", q).group(1)
            assert a == str(sum(o["colour"] == colour for o in objs))
        elif row["question_type"] == "colour":
            kind = re.search(r"colour is the (\w+)\?", q).group(1)
            assert [o["colour"] for o in objs if o["kind"] == kind] == [a]
        else:
            colour, kind = re.search(r"Where is the (\w+) (\w+)\?", q).groups()
            assert [shapes_vqa.position(o["cell"]) for o in objs if (o["colour"], o["kind"]) == (colour, kind)] == [a]
        x0, y0, x1, y1 = objs[0]["box"]
        centre = img.getpixel(((x0 + x1) // 2, (y0 + 3 * y1) // 4))  # inside every shape (the triangle's lower half)
        assert max(abs(u - v) for u, v in zip(centre, shapes_vqa.COLOURS[objs[0]["colour"]])) < 60


def test_bundled_sources_write_pngs_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FTRAY_CACHE", str(tmp_path))
    monkeypatch.setitem(GENERATORS, "shapes_vqa", (shapes_vqa.generate, 12, 4))  # a small copy: same code path
    assert set(GENERATORS) == IMAGE_SETS
    ds = load_rows("bundled:shapes_vqa", "test")
    assert len(ds) == 4 and set(ds.column_names) >= {"images", "messages", "answer", "objects"}
    path = ds[0]["images"][0]
    assert path.startswith(str(tmp_path)) and Image.open(path).size == (96, 96)
    assert image_set_path("shapes_vqa", "test").read_text() == image_set_path("shapes_vqa", "test").read_text()
    with pytest.raises(DataError, match="no split"):
        load_rows("bundled:shapes_vqa", "validation")


def test_vision_rows_are_validated():
    row = {"images": ["a.png"], "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "?"}]},
                                             {"role": "assistant", "content": [{"type": "text", "text": "red"}]}]}
    assert row_problem(row, "vision") is None
    assert "image parts" in row_problem({**row, "images": []}, "vision")
    bad = {**row, "messages": [{"role": "user", "content": [{"type": "audio"}]}, row["messages"][1]]}
    assert "parts" in row_problem(bad, "vision")


@pytest.mark.parametrize("kind", SHIFTS)
def test_shifts_change_the_image_deterministically(kind):
    (img, _), = shapes_vqa.generate(1, 1, 0)[0]
    a, info = shift_image(img, kind, severity=3, seed=4)
    b, _ = shift_image(img, kind, severity=3, seed=4)
    assert a.size == img.size and png(a) == png(b) and png(a) != png(img)
    assert info["kind"] == kind and info["severity"] == 3
    if kind == "occlusion":
        x0, y0, x1, y1 = info["box"]
        assert a.getpixel(((x0 + x1) // 2, (y0 + y1) // 2)) == (128, 128, 128)
        assert x1 - x0 == round(96 * 0.45)
    with pytest.raises(ValueError, match="severity"):
        shift_image(img, kind, severity=4)


def test_occlusion_box_can_be_given_and_rows_are_written(tmp_path):
    (img, row), = shapes_vqa.generate(2, 1, 0)[0]
    box = row["objects"][0]["box"]
    out, info = shift_image(img, "occlusion", box=box)
    assert info["box"] == box and out.getpixel((box[0] + 1, box[1] + 1)) == (128, 128, 128)
    src = tmp_path / "a.png"
    img.save(src)
    (shifted,) = shift_rows([{**row, "images": [str(src)]}], "blur", 2, tmp_path / "blur")
    assert shifted["shift"][0]["kind"] == "blur" and shifted["answer"] == row["answer"]
    assert Image.open(shifted["images"][0]).size == img.size and shifted["images"][0] != str(src)
