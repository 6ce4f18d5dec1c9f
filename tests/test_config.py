import pytest

from barnfast.config import load_recipe, recipe_from_dict
from barnfast.errors import ConfigError
from barnfast.train import parse_args, recipe_from_args
from barnfast.training.trainer import lr_at


def test_full_recipe_is_llava15():
    r = load_recipe("llava15")
    s1, s2 = r.stages
    assert (s1.name, s1.lr, s1.global_batch, s1.train_llm, s1.template) == ("stage1", 1e-3, 256, False, "plain")
    assert (s2.name, s2.lr, s2.global_batch, s2.train_llm) == ("stage2", 2e-5, 128, True)
    for s in (s1, s2):
        assert (s.epochs, s.warmup_ratio, s.weight_decay) == (1, 0.03, 0.0)


def test_overrides_apply_to_the_named_field():
    r = load_recipe("llava15-tiny", {"train.seed": 7, "stage2.lr": 1e-4, "stages.max_steps": 3, "output_dir": "x"})
    assert r.train.seed == 7 and r.stages[1].lr == 1e-4 and r.stages[0].lr == 1e-3
    assert all(s.max_steps == 3 for s in r.stages) and r.output_dir == "x"


@pytest.mark.parametrize("override, field", [
    ({"stage1.lr": -1.0}, "stages[stage1].lr"),
    ({"stage2.global_batch": 0}, "stages[stage2].global_batch"),
    ({"train.token_budget": 3}, "train.token_budget"),
    ({"train.dtype": "fp8"}, "train.dtype"),
    ({"data.image_aspect": "crop"}, "data.image_aspect"),
    ({"data.max_skip_fraction": 2.0}, "data.max_skip_fraction"),
    ({"model.projector_approximate": "relu"}, "model.projector_approximate"),
])
def test_bad_values_fail_naming_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace("[", r"\[").replace("]", r"\]")):
        load_recipe("llava15-tiny", override)


def test_unknown_fields_and_sections_are_rejected():
    with pytest.raises(ConfigError, match="unknown field"):
        recipe_from_dict({"train": {"sed": 1}})
    with pytest.raises(ConfigError, match="unknown section"):
        recipe_from_dict({"trian": {}})
    with pytest.raises(ConfigError, match="stage3"):
        load_recipe("llava15-tiny", {"stage3.lr": 1.0})
    with pytest.raises(ConfigError, match="known recipe"):
        load_recipe("nope")


def test_cli_picks_tiny_recipe_and_parses_set_values():
    r = recipe_from_args(parse_args(["--backbone", "llama3-tiny", "--set", "stage2.lr=3e-4", "--set",
                                     "train.packing=false", "--max-steps", "2"]))
    assert r.model.backbone == "llama3-tiny" and r.stages[0].global_batch == 16
    assert r.stages[1].lr == 3e-4 and r.train.packing is False and r.stages[0].max_steps == 2
    assert recipe_from_args(parse_args(["--backbone", "llama3"])).stages[0].global_batch == 256


def test_cosine_schedule_with_warmup():
    total, base = 100, 1e-3
    lrs = [lr_at(s, total, base, 0.03) for s in range(total)]
    # 3 warm-up steps, lr = base * step / 3 as transformers' (0 at step 0), the peak at step 3
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(base / 3) and lrs[3] == pytest.approx(base)
    assert max(lrs) == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))  # monotone decay after warm-up
    assert lrs[-1] < 1e-3 * base * 10


@pytest.mark.parametrize("argv, field, words", [
    (["--set", "train.packing=False"], "train.packing", ["'False'", "use true or false"]),
    (["--set", 'lora.enabled="false"'], "lora.enabled", ["'false'", "boolean"]),
    (["--set", "stage1.lr=true"], r"stages\[stage1\].lr", ["True", "finite number"]),
    (["--set", "stage2.lr=inf"], r"stages\[stage2\].lr", ["inf", "finite number"]),
    (["--set", "stage2.lr=nan"], r"stages\[stage2\].lr", ["nan", "finite number"]),
    (["--set", "stage2.lr=abc"], r"stages\[stage2\].lr", ["'abc'", "finite number"]),
    (["--set", "stages.epochs=1.5"], r"stages\[stage1\].epochs", ["1.5", "integer", "fractional"]),
    (["--set", "train.token_budget=1024.0"], "train.token_budget", ["1024.0", "integer"]),
    (["--seed", "-1"], "train.seed", ["-1", ">= 0"]),
    (["--set", "data.num_workers=true"], "data.num_workers", ["True", "integer"]),
    (["--set", "model.s2_scales=[1, 2.5]"], "model.s2_scales", ["2.5", "integer"]),
    (["--set", "model.backbone=3"], "model.backbone", ["3", "string"]),
    (["--stages", "stage_2"], "--stages", ["stage_2", "stage1, stage2"]),
])
def test_wrong_types_are_refused_through_the_cli_before_any_work(tmp_path, argv, field, words):
    """Each value is refused by barnfast.train.main naming the field, the value and the type, before the
    trainer (which creates the output folder first) is reached."""
    from barnfast.train import main

    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=field) as info:
        main(["--backbone", "llama1-tiny", "--output-dir", str(out), "--no-progress", *argv])
    for word in words:
        assert word in str(info.value), str(info.value)
    assert not out.exists()


def test_checks_come_from_the_annotations_so_new_fields_are_covered():
    from dataclasses import dataclass as dc

    from barnfast.config import check_types

    @dc
    class NewSection:
        flag: bool = False
        ratio: float = 0.5
        count: int | None = None

    check_types(NewSection, {"flag": True, "ratio": 1, "count": None}, "new")  # int for float is fine
    for values, word in [({"flag": "true"}, "new.flag"), ({"ratio": float("inf")}, "new.ratio"),
                         ({"count": 2.0}, "new.count")]:
        with pytest.raises(ConfigError, match=word):
            check_types(NewSection, values, "new")


def test_bad_toml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[train]\nseed = 1\npacking = tru\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: not valid TOML: .*line 3"):
        load_recipe(str(bad))
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b'[train]\nseed = 1\ndtype = "\xff\xfe"\n')
    with pytest.raises(ConfigError, match=r"binary\.toml: line 3 is not UTF-8"):
        load_recipe(str(binary))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[train]\npacking = "no"\n')
    with pytest.raises(ConfigError, match="train.packing: expected a boolean"):
        load_recipe(str(wrong))
