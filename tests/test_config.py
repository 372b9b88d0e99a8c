"""Run spec: YAML + overrides, and errors that name the field before any Ray work."""

import pytest

from ftray.config import SpecError, apply_overrides, build_spec, load_spec


def test_packaged_quickstart_loads():
    spec = load_spec("quickstart")
    assert [m["name"] for m in spec.methods] == ["lora", "masked_thought"]
    assert spec.methods[0]["r"] == 16 and spec.methods[1]["warmup"] == 0.66  # defaults filled in


def test_overrides_reach_nested_fields_and_list_items():
    spec = load_spec("quickstart", ["train.lr=1e-4", "methods.0.r=4", "scaling.num_workers=1", "data.packing=true"])
    assert spec.train.lr == 1e-4 and spec.methods[0]["r"] == 4 and spec.scaling.num_workers == 1 and spec.data.packing


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"scaling": {"num_workers": 0}}, "scaling.num_workers: Input should be greater than or equal to 1"),
        ({"train": {"lrr": 1}}, "train.lrr: Extra inputs are not permitted"),
        ({"train": {"lr": "fast"}}, "train.lr: Input should be a valid number"),
        ({"methods": [{"name": "lorax"}]}, "methods.0.name: unknown method 'lorax'; known: car, cofitune, corda, core_tuning"),
        ({"methods": [{"name": "lora", "rank": 8}]}, "methods.0.rank: Extra inputs are not permitted (method 'lora')"),
        ({"methods": ["lora", "hft"]}, "methods.0: 'lora' cannot be combined with 'hft'"),
        ({"methods": [{"name": "masked_thought", "p": 1.5}]}, "methods.0.p: Input should be less than or equal to 1"),
    ],
)
def test_bad_specs_name_the_field(raw, expected):
    with pytest.raises(SpecError) as err:
        build_spec(raw)
    assert expected in str(err.value)


def test_bad_override_and_missing_recipe(tmp_path):
    with pytest.raises(SpecError, match="expected KEY=VALUE"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(SpecError, match="not an index"):
        apply_overrides({"methods": [{"name": "lora"}]}, ["methods.3.r=4"])
    with pytest.raises(SpecError, match="no such file"):
        load_spec(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(SpecError, match="not valid YAML"):
        load_spec(bad)
