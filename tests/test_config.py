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
    assert lrs[0] == pytest.approx(base / 3) and lrs[2] == pytest.approx(base)  # 3 warm-up steps
    assert max(lrs) == pytest.approx(base)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))  # monotone decay after warm-up
    assert lrs[-1] < 1e-3 * base * 10
