"""`evaluation.finetune.kinds`: one fine-tuning setting per kind of target (issue 25: the colours need another
ratio and image match than the digits), without changing the edits already made for the other kinds."""

from types import SimpleNamespace

import pytest

from cad_ray.config import parse_config
from cad_ray.errors import CadRayError
from cad_ray.stages.evaluation import check_finetune_kinds, edit_settings, finetune_key

FINETUNE = {"ratio": 0.05, "selection": "ff+attn2/global/kind-max",
            "unlearning": {"rounds": 2, "steps": 7, "target": "images", "images_from": 0.1}}
COLOUR = {"ratio": 0.1, "unlearning": {"match": "shape"}}


def options(finetune, targets=("three", "blue")):
    concepts = [{"name": t} for t in targets]
    return parse_config({"concepts": concepts, "evaluation": {"targets": list(targets), "edits": ["cad-finetune"],
                                                              "finetune": finetune}}).evaluation


STORE = SimpleNamespace(fingerprint="f", manifest={"config_hash": "h"})


def test_a_kind_replaces_only_the_fields_it_names():
    blue = options({**FINETUNE, "kinds": {"colour": COLOUR}}).finetune.for_kind("colour")
    assert (blue.ratio, blue.unlearning.match) == (0.1, "shape")
    # the fields the entry does not name are the section's own, unlearning's field by field
    assert (blue.unlearning.rounds, blue.unlearning.steps, blue.selection) == (2, 7, "ff+attn2/global/kind-max")
    three = options({**FINETUNE, "kinds": {"colour": COLOUR}}).finetune.for_kind("digit")
    assert (three.ratio, three.unlearning.match) == (0.05, "pixels")


def test_the_rows_and_the_edit_key_of_each_target_follow_its_kind():
    with_kinds = options({**FINETUNE, "kinds": {"colour": COLOUR}})
    without = options(FINETUNE)
    assert edit_settings("cad-finetune", with_kinds, "blue") == [("ff+attn2/global/kind-max", 0.1)]
    assert edit_settings("cad-finetune", with_kinds, "three") == [("ff+attn2/global/kind-max", 0.05)]
    # a digit's edit made before the colours had their own setting is not made again; the colour's is
    assert finetune_key(with_kinds, STORE, "three") == finetune_key(without, STORE, "three")
    assert finetune_key(with_kinds, STORE, "blue") != finetune_key(without, STORE, "blue")
    # and the evaluation's images, which depend on every edit, are made anew
    assert with_kinds.options_hash() != without.options_hash()


@pytest.mark.parametrize("kinds, message", [
    ({"colour": {"ratioo": 0.1}}, "kinds.colour.ratioo"),
    ({"colour": {"unlearning": {"match": "colour"}}}, "kinds.colour.unlearning.match"),
    ({"colour": {"ratio": 2}}, "kinds.colour.ratio"),
])
def test_a_kind_with_a_field_the_section_does_not_take_is_refused_at_load(kinds, message):
    with pytest.raises(CadRayError, match=message):
        options({**FINETUNE, "kinds": kinds})


def test_a_kind_no_concept_of_the_run_has_is_refused_and_targets_may_leave_one_out():
    digits_only = options({**FINETUNE, "kinds": {"colour": COLOUR}}, targets=("three", "seven"))
    check_finetune_kinds(digits_only, ["three", "seven", "green"])  # --targets narrowed a run that has colours
    with pytest.raises(CadRayError, match="colour, a kind no concept of the run has"):
        check_finetune_kinds(digits_only, ["three", "seven", "one"])


@pytest.mark.parametrize("scope, moved", [(None, "ff"), ("attn2", "attn2")])
def test_the_esd_baseline_moves_the_weights_of_its_own_scope(small_run, tmp_path, scope, moved):
    """A run that attributes a wide scope for cad-finetune's selections (`all`) keeps the ESD-style baseline on
    the weights it was measured on (finetune.scope); without it, the run's scope."""
    import shutil

    import torch
    from conftest import small_config

    from cad_ray.method.scopes import select_parameters
    from cad_ray.models import load_model
    from cad_ray.stages.edit_workers import EditWorker

    root = tmp_path / "run"
    shutil.copytree(small_run, root)
    finetune = {"steps": 2, "samples": 1, "lr": 0.01, **({"scope": scope} if scope else {})}
    config = small_config(evaluation={"targets": ["seven"], "edits": ["finetune"], "finetune": finetune})
    worker = EditWorker(config, str(root))
    worker.make("finetune", "seven")
    before = dict(worker.model.named_parameters())
    after = dict(load_model(str(root / "edits" / "finetune-seven" / "model")).named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= {n for n, _ in select_parameters(before.items(), moved)}


def test_the_baseline_scope_is_in_the_edit_key_only_where_set():
    assert "scope" not in options(FINETUNE).finetune.key()
    assert options({**FINETUNE, "scope": "ff+attn2+tokens"}).finetune.key()["scope"] == "ff+attn2+tokens"


def test_unlearning_fields_added_later_rename_nothing_at_their_defaults():
    """Edits and image blocks made before `batch` and `timestep_power` keep their names where those are at their
    defaults; set, they name what they change."""
    from cad_ray.options.evaluation import FinetuneOptions

    before = FinetuneOptions.model_validate({"unlearning": {"rounds": 3}})
    for dump in (before.key(), before.named()):
        assert not {"batch", "timestep_power"} & set(dump["unlearning"])
    assert "kinds" not in before.named()
    low = FinetuneOptions.model_validate({"unlearning": {"rounds": 3, "timestep_power": 2}})
    assert low.key()["unlearning"]["timestep_power"] == low.named()["unlearning"]["timestep_power"] == 2
