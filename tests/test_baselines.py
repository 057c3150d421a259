"""The field's baselines beside CAD (cad_ray.method.baselines): the simplest attributions, ConceptPrune and UCE,
in the same score tables, selections and edits."""

import numpy as np
import pandas as pd
import pytest
import torch

from cad_ray.errors import CadRayError
from cad_ray.method.baselines import (ConceptPrune, conceptprune_masks, conceptprune_scores, derived_scores,
                                      uce_weights)
from cad_ray.method.editing import Selection


def test_gradient_and_magnitude_are_the_factors_of_the_score():
    weights = {"a": np.array([[2.0, -0.5], [0.0, 4.0]], dtype=np.float32)}
    scores = {"a": np.array([[1.0, 1.0], [0.0, -2.0]], dtype=np.float32)}
    gradient = derived_scores("gradient", scores, weights)["a"]
    np.testing.assert_allclose(gradient, [[0.5, 2.0], [0.0, 0.5]])  # |score / w|; 0 where w = 0
    np.testing.assert_allclose(derived_scores("magnitude", scores, weights)["a"], [[2.0, 0.5], [0.0, 4.0]])


def published_conceptprune_mask(weight, squares, skill_ratio):
    """ConceptPrune's rule written from its code: per call, top int(k * in) of each row by |W| * A_t, where
    A_t > A_base,t; the union over calls."""
    target, base = np.sqrt(squares[0]), np.sqrt(squares[1])
    k = int(skill_ratio * weight.shape[1])
    union = np.zeros(weight.shape, dtype=bool)
    for t in range(target.shape[0]):
        metric, metric_base = np.abs(weight) * target[t], np.abs(weight) * base[t]
        top = np.zeros(weight.shape, dtype=bool)
        np.put_along_axis(top, np.argsort(-metric, axis=1, kind="stable")[:, :k], True, axis=1)
        union |= top & (metric > metric_base)
    return union


@pytest.mark.parametrize("skill_ratio", [0.05, 0.1, 0.25, 0.5])
def test_conceptprune_scores_reproduce_the_published_union_at_every_skill_ratio(skill_ratio):
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(6, 40))
    weight[0, 3] = 0.0
    squares = rng.uniform(0.1, 2.0, size=(2, 4, 40))
    score = conceptprune_scores(weight, squares).astype(np.float32)  # stored as float32
    expected = published_conceptprune_mask(weight, squares, skill_ratio)
    assert expected.any() and not expected.all()
    np.testing.assert_array_equal(conceptprune_masks({"w": score}, skill_ratio)["w"], expected)
    assert score[0, 3] == 0  # a zero weight is never skilled


def test_conceptprune_statistics_add_over_shards_and_count_every_token(digits_model):
    from cad_ray.method.concepts import build_concept
    from cad_ray.config import ConceptSpec

    concept = build_concept(ConceptSpec(name="seven"), digits_model)
    method = ConceptPrune(digits_model, timesteps=3, steps=5, batch=2)
    whole = method.partial_sum(concept, [0, 1, 2, 3])
    parts = method.partial_sum(concept, [0, 1]) + method.partial_sum(concept, [2, 3])
    for name in method.tensor_names:
        np.testing.assert_allclose(parts.grads[name].numpy(), whole.grads[name].numpy(), rtol=1e-10)
    # each token's vector has unit norm: per call, the squares sum to samples x 2 guidance halves x tokens
    modules = dict(digits_model.unet.named_modules())
    tokens = {}
    hooks = [modules[n[:-len(".weight")]].register_forward_pre_hook(
        lambda m, i, n=n: (tokens.setdefault(n, i[0].shape[:-1].numel() // 2), None)[1]) for n in method.tensor_names]
    digits_model.sample(["seven"], steps=1)
    for h in hooks:
        h.remove()
    for name in method.tensor_names:
        totals = whole.grads[name].sum(dim=2)  # (concept / base, call)
        np.testing.assert_allclose(totals.numpy(), 4 * 2 * tokens[name], rtol=1e-5)
    assert all(s.shape == (2, 3, w.shape[1]) for s, (_, w) in zip(whole.grads.values(), method.parameters))
    with pytest.raises(CadRayError, match="exceeds the 5 sampling steps"):
        ConceptPrune(digits_model, timesteps=6, steps=5)


def test_uce_solves_its_least_squares_problem(digits_model):
    """With a large erase scale the target's tokens go where the guide's went; with a large preserve scale the
    kept prompts' keys and values do not move; only attn2's to_k and to_v change."""
    from cad_ray.method.baselines import erase_pair

    strong = uce_weights(digits_model, ["seven"], ["eight"], lamb=1e-3, erase_scale=1e4, preserve_scale=1e-6)
    assert strong and all(n.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for n in strong)
    old, new = erase_pair(digits_model, "seven", " ")
    params = dict(digits_model.named_parameters())
    for name, w in strong.items():
        target = params[name].detach() @ new.T
        np.testing.assert_allclose((w @ old.T).numpy(), target.numpy(), atol=1e-2 * target.abs().max().item())
    kept = uce_weights(digits_model, ["seven"], ["eight"], lamb=1e-3, erase_scale=1e-6, preserve_scale=1e4)
    eight = digits_model.encode(["eight"])[0]
    for name, w in kept.items():
        before = params[name].detach() @ eight.T
        np.testing.assert_allclose((w @ eight.T).numpy(), before.numpy(), atol=1e-2 * before.abs().max().item())


def test_a_selection_names_its_method():
    assert str(Selection.parse("gradient:attn2/global/kind-mean")) == "gradient:attn2/global/kind-mean"
    assert Selection.parse("conceptprune").method == "conceptprune"
    assert Selection.parse("attn2/global/none").method == "cad"
    with pytest.raises(CadRayError, match="unknown attribution method 'saliency'"):
        Selection.parse("saliency:ff/row/none")


@pytest.fixture(scope="module")
def baseline_run(tmp_path_factory):
    from conftest import small_config

    from cad_ray.distributed import run_attribution

    root = str(tmp_path_factory.mktemp("runs") / "baselines")
    config = small_config(scope="ff+attn2", conceptprune={"timesteps": 3, "steps": 6},
                          concepts=[{"name": "seven", "objectives": ["erase", "conceptprune"]},
                                    {"name": "one", "objectives": ["erase", "conceptprune"]}])
    run_attribution(config, root, local=True, progress=False)
    return root, config


def test_every_method_is_read_from_one_run(baseline_run):
    from cad_ray.store import ScoreStore

    store = ScoreStore(baseline_run[0])
    assert ("seven", "conceptprune") in set(store.concepts().itertuples(index=False, name=None))
    cad = store.tensor_scores("seven")
    weights = store.tensor_weights({n: s.shape for n, s in cad.items()})
    gradient = store.tensor_scores("seven", method="gradient")
    name = next(iter(cad))
    np.testing.assert_allclose(gradient[name], np.abs(cad[name] / weights[name]), rtol=1e-5)
    top = store.top("seven", k=5, method="magnitude")
    largest = np.sort(np.concatenate([np.abs(w).ravel() for w in weights.values()]))[::-1][:5]
    np.testing.assert_allclose(top["score"], largest, rtol=1e-6)
    assert "grad" not in top  # score / weight is CAD's gradient only for CAD's scores
    prune = store.tensor_scores("seven", method="conceptprune")
    assert prune and all(n.endswith("ff.net.2.weight") for n in prune)
    assert all(((s >= 0) & (s <= 1)).all() for s in prune.values())
    masks = store.masks("seven", "conceptprune", 0.05)
    assert 0 < sum(m.sum() for m in masks.values())
    assert store.overlap("seven", "seven", 50, method="cad", method_b="cad")["jaccard"] == 1.0


def test_the_cli_ranks_and_edits_by_a_baseline(baseline_run, tmp_path, capsys):
    from cad_ray.cli import main
    from cad_ray.models import load_model

    root = baseline_run[0]
    assert main(["top", "--root", root, "--concept", "seven", "--k", "3", "--method", "conceptprune"]) == 0
    assert "ConceptPrune" in capsys.readouterr().out
    assert main(["edit", "--root", root, "--edit", "uce", "--target", "seven", "--out", str(tmp_path / "u")]) == 0
    assert "4 cross-attention key/value projections rewritten" in capsys.readouterr().out
    edited, original = dict(load_model(str(tmp_path / "u")).named_parameters()), dict(load_model().named_parameters())
    changed = {n for n in original if not torch.equal(original[n], edited[n])}
    assert changed and all(".attn2.to_" in n for n in changed)
    assert main(["edit", "--root", root, "--edit", "uce", "--target", "seven", "--ratio", "0.1",
                 "--out", str(tmp_path / "v")]) == 1
    assert "leave out --ratio" in capsys.readouterr().err


def test_baseline_edits_follow_cad_erase_or_their_own_search(baseline_run):
    from cad_ray.stages.evaluation import check_targets, plan_test_rows, prompt_panels
    from cad_ray.store import ScoreStore

    root, config = baseline_run
    options = config.evaluation.model_copy(update={
        "targets": ["seven"], "edits": ["cad-erase", "random", "gradient", "magnitude", "conceptprune", "uce"]})
    picks = {("cad-erase", "seven"): ("attn2/global/kind-mean", 0.03, True),
             ("conceptprune", "seven"): ("conceptprune", 0.1, False)}
    rows = plan_test_rows(options, prompt_panels(options), picks)
    settings = rows.groupby("edit")[["selection", "ratio"]].first()
    for edit in ("random", "gradient", "magnitude"):  # the same scope, unit and count as cad-erase's pick
        assert tuple(settings.loc[edit]) == ("attn2/global/kind-mean", 0.03)
    assert tuple(settings.loc["conceptprune"]) == ("conceptprune", 0.1)
    assert tuple(settings.loc["uce"]) == ("uce", 0.0)  # no selection: no ratio, as for `none`
    check_targets(options, ScoreStore(root), root)
    no_prune = options.model_copy(update={"targets": ["red"], "edits": ["conceptprune"]})
    with pytest.raises(CadRayError, match="list conceptprune among its objectives"):
        check_targets(no_prune, ScoreStore(root), root)


def test_share_is_one_measure_of_every_edits_size(baseline_run):
    """`ratio` is what a selection takes (0.0 for an edit without one); `share` is the share of the model's weights
    an edit sets, whatever it is: zeroed components for a zeroing edit, every rewritten weight for UCE."""
    from cad_ray.models import load_model
    from cad_ray.stages.edit_workers import Editor
    from cad_ray.store import RunRoot, ScoreStore

    root, config = baseline_run
    model = load_model(config.model)
    editor = Editor(config, RunRoot(root), model, ScoreStore(root))
    weights = sum(p.numel() for _, p in model.named_parameters())
    assert editor.share("none", "", "", 0.0) == 0.0
    zeroed = editor.zeroed("cad-erase", "seven", "attn2/global/kind-mean", 0.03)
    assert zeroed > 0 and editor.share("cad-erase", "seven", "attn2/global/kind-mean", 0.03) == zeroed / weights
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with editor.applied("uce", "seven", "uce", 0.0):
        rewritten = sum(int((p != before[n]).sum()) for n, p in model.named_parameters())
    assert 0 < rewritten and editor.share("uce", "seven", "uce", 0.0) == rewritten / weights


def test_random_draws_are_each_targets_own_and_further_draws_judge_the_target_alone(baseline_run):
    """One random draw shared by every target would make them one control: seed 0 of the digits study drew
    three's own word for all of them. Each target draws its own; further draws are made on its images only."""
    from cad_ray.stages.evaluation import ImageJudge, plan_test_rows, prompt_panels, target_rows

    root, config = baseline_run
    options = config.evaluation.model_copy(update={"targets": ["seven"], "edits": ["cad-erase", "random"],
                                                   "random_draws": 3})
    rows = plan_test_rows(options, prompt_panels(options), {("cad-erase", "seven"): ("attn2/global/kind-mean", 0.03,
                                                                                     True)})
    random = rows[rows["edit"] == "random"]
    first = random[random["draw"] == 0]
    assert len(first) == (rows["edit"] == "cad-erase").sum()  # the first draw: every test image
    for draw in (1, 2):
        further = random[random["draw"] == draw]
        assert target_rows(further, "seven").all() and len(further) == target_rows(first, "seven").sum()
    assert set(random["draw"]) == {0, 1, 2} and (rows.loc[rows["edit"] != "random", "draw"] == 0).all()

    judge = ImageJudge(config, root)

    def masks(target, draw, judge=judge):
        return judge._masks("random", target, "attn2/global/kind-mean", 0.03, draw)

    def same(a, b):
        return all(np.array_equal(a[n], b[n]) for n in a)

    counts = {sum(int(m.sum()) for m in masks(t, d).values()) for t, d in (("seven", 0), ("seven", 1), ("one", 0))}
    assert len(counts) == 1 and counts.pop() > 0  # the same count, elsewhere
    assert not same(masks("seven", 0), masks("seven", 1)) and not same(masks("seven", 0), masks("one", 0))
    assert same(masks("seven", 1), masks("seven", np.int64(1), ImageJudge(config, root)))  # a table's int64 too
    # in one batch, each row is made under its own draw: the same prompt and seed give other images
    asked = random[target_rows(random, "seven")]
    batch = asked[(asked["prompt"] == asked["prompt"].iloc[0]) & (asked["seed"] == asked["seed"].iloc[0])]
    assert list(batch["draw"]) == [0, 1, 2]
    images = judge(batch).set_index("draw")["image_png"]
    assert len(set(images)) == 3
    assert judge(batch[batch["draw"] == 1])["image_png"].iloc[0] == images[1]


def test_the_baselines_run_on_a_stable_diffusion_pipeline(tiny_sd_folder):
    """ConceptPrune's hooks and UCE's token slices on a diffusers SD pipeline (CLIP tokenizer, padded to 77)."""
    from cad_ray.method.baselines import erase_pair
    from cad_ray.method.objectives import Concept
    from cad_ray.models import load_model

    model = load_model(str(tiny_sd_folder))
    concept = Concept("church", ("a photo of a church",), ("a photo",))
    method = ConceptPrune(model, timesteps=2, steps=3, batch=2)
    attribution = method.finish(concept, method.partial_sum(concept, [0, 1]))
    assert set(attribution.scores) == set(method.tensor_names) and method.tensor_names
    assert all(n.endswith("ff.net.2.weight") for n in method.tensor_names)
    lengths = model.token_lengths(["a photo of a church", " "])
    assert lengths[0] > lengths[1] == 2  # start and end tokens; the guide ' ' has no word
    old, new = erase_pair(model, "a photo of a church", " ")
    length = model.encode([""]).shape[1]  # the tokenizer's padded length (77 for SD; the tiny one's is shorter)
    assert old.shape == new.shape and old.shape[0] == length - (lengths[0] - 2)
    weights = uce_weights(model, ["a photo of a church"], ["a photo of a house"])
    assert weights and all(".attn2.to_" in n for n in weights)
