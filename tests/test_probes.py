"""Completeness probes on the digits model, each against a known answer (issue 25)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from cad_ray.digits import all_prompts
from cad_ray.digits.judges import builtin_judges
from cad_ray.errors import CadRayError
from cad_ray.method.editing import Selection, edited, selection_masks
from cad_ray.method.probes import ProbeSettings, TextualInversion, complete, concept_images, word_id
from cad_ray.method.scopes import never_selected, special_token_ids
from cad_ray.seeds import derive_seed

NEVER_THREE = Path(__file__).parent / "fixtures" / "never-three"  # jobs/train_digits.py --exclude three
STEPS = 10  # DDPM steps of the probes' images: enough for the judge to read a digit
FAST = ProbeSettings(steps=100, lr=0.03, batch=32, images=64)


@pytest.fixture(scope="module")
def threes(digits_model):
    torch.manual_seed(0)
    return concept_images(digits_model, all_prompts(3, None), FAST.images, seed=0, steps=STEPS)


def share_of_threes(images) -> float:
    return float((builtin_judges().digits(images) == 3).mean())


def inversion(model, threes):
    probe = TextualInversion(model, "three", all_prompts(3, None), FAST)
    vector = probe.fit(model, threes, seed=0)
    learned = share_of_threes(probe.sample(model, vector, 32, seed=1, steps=STEPS).images)
    floor = share_of_threes(probe.sample(model, probe.initial(model), 32, seed=1, steps=STEPS).images)
    assert float(vector.norm()) <= probe.bound + 1e-5  # a word the text encoder could have had
    return learned, floor


def test_inversion_recovers_a_word_only_edit(digits_model, threes):
    """Zeroing three's words erases it from every prompt that asks by its words; one learned word brings it back,
    since every weight that draws a three is still there."""
    table = digits_model.text_encoder.get_input_embeddings().weight
    rows = [word_id(digits_model, "three"), digits_model.tokenizer.ids["3"]]
    masks = {n: np.zeros(tuple(p.shape), dtype=bool) for n, p in digits_model.named_parameters()
             if p is table}
    name = next(iter(masks))
    masks[name][rows] = True
    with edited(digits_model, masks):
        learned, floor = inversion(digits_model, threes)
    assert floor <= 0.25
    assert learned >= 0.8


def test_inversion_does_not_find_a_never_learned_concept(threes):
    from cad_ray.models import load_model

    never = load_model(str(NEVER_THREE))
    learned, floor = inversion(never, threes)
    assert learned <= floor + 0.15


def test_completion_from_the_last_step_returns_the_start_image(digits_model, threes):
    start = threes[:4]
    done = complete(digits_model, start, [""] * 4, strength=0.0, seed=3, steps=STEPS)
    assert torch.equal(done.latents[-1], start)
    partly = complete(digits_model, start, [""] * 4, strength=0.5, seed=3, steps=STEPS)
    assert not torch.equal(partly.latents[-1], start)
    with pytest.raises(CadRayError, match="share of the sampling steps"):
        complete(digits_model, start, [""] * 4, strength=1.5, seed=3, steps=STEPS)


def test_special_tokens_are_never_selected(digits_model):
    """A selection over the token table never takes <pad>, <bos> or <eos> however high their scores: they are in
    every prompt, the empty one used for guidance too."""
    special = special_token_ids(digits_model)
    assert special == sorted(digits_model.tokenizer.ids[t] for t in ("<pad>", "<bos>", "<eos>"))
    table = "text_encoder.embeddings.token_embedding.weight"
    scores = {table: np.ones((32, 64), dtype=np.float32)}
    scores[table][special] = 100.0  # the specials' scores lead
    for text in ("tokens/global/none", "tokens/neuron/none", "tokens/row/none"):
        masks = selection_masks(lambda c: scores, "three", [], Selection.parse(text), 0.2,
                                protected=never_selected(digits_model))
        rows = np.flatnonzero(masks[table].any(axis=1))
        assert not set(rows) & set(special), text
        assert masks[table].sum() > 0
    unprotected = selection_masks(lambda c: scores, "three", [], Selection.parse("tokens/neuron/none"), 0.2)
    assert set(np.flatnonzero(unprotected[table].any(axis=1))) >= set(special)  # the test can fail


PROBE_EVALUATION = {"targets": ["seven"], "edits": ["cad-erase"], "ratios": [0.05], "images_per_prompt": 1,
                    "prompt_panel": "canonical", "selection": "ff/global/none", "steps": 6, "batch_size": 16,
                    "probes": ["inversion", "completion", "guidance"],
                    "probe": {"steps": 5, "images": 8, "samples": 4, "strengths": [0.0, 0.5], "guidance_scales": [0.4],
                              "references": {"seven": str(NEVER_THREE)}}}


def test_guidance_steers_toward_the_target_and_is_plain_sampling_at_scale_zero(digits_model):
    """Classifier guidance by the digits judge: scale 0 is the model's own sampling, image for image; from the
    empty prompt (which draws few threes) guidance toward three draws mostly threes on the unedited model."""
    from cad_ray.judges.digits import DigitsJudge
    from cad_ray.method.probes import ClassifierGuidance

    judge = DigitsJudge()
    plain = digits_model.sample([""] * 32, seed=derive_seed(1, "probe-sample"), steps=STEPS).images
    unguided = ClassifierGuidance(judge.log_probability, "three", 0.0).sample(digits_model, [""], 32, 1, STEPS)
    np.testing.assert_array_equal(unguided.images, plain)
    guided = ClassifierGuidance(judge.log_probability, "three", 0.4).sample(digits_model, [""], 32, 1, STEPS)
    assert share_of_threes(plain) <= 0.25 and share_of_threes(guided.images) >= 0.5
    with pytest.raises(CadRayError, match="scale"):
        ClassifierGuidance(judge.log_probability, "three", float("nan"))


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_guidance_reads_every_prediction_type_as_noise_and_back(kind):
    from cad_ray.method.probes import _epsilon, _output

    x, out, alpha = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.tensor(0.3)
    torch.testing.assert_close(_output(kind, _epsilon(kind, out, x, alpha), x, alpha), out)
    if kind == "v_prediction":  # x = sqrt(a) x0 + sqrt(1-a) eps and v = sqrt(a) eps - sqrt(1-a) x0
        x0, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
        x = alpha.sqrt() * x0 + (1 - alpha).sqrt() * eps
        torch.testing.assert_close(_epsilon(kind, alpha.sqrt() * eps - (1 - alpha).sqrt() * x0, x, alpha), eps)


def test_probe_blocks_are_judged_beside_their_ceiling_and_resume(small_run, tmp_path, monkeypatch):
    """The probing stage after an evaluation: every unit's images judged (the edit's, the unedited model's, the
    never-learned reference's), summarised beside the ceiling and the reference; a second run computes nothing,
    and a lost part is all that is made again, equal to the first time."""
    import shutil

    import pandas as pd
    from conftest import small_config

    from cad_ray.distributed import run_evaluation

    root = str(tmp_path / "run")
    shutil.copytree(small_run, root)
    config = small_config(evaluation=PROBE_EVALUATION)
    first = run_evaluation(config, root, local=True, progress=False)["probes"]
    assert first["units"] == first["units_computed"] == 3 * 3  # cad-erase, none, never-learned; three probes
    summary = pd.read_parquet(Path(root) / "probe_summary")
    assert set(summary["edit"]) == {"cad-erase", "none", "never-learned"}
    assert set(summary[summary["probe"] == "completion"]["setting"]) == {"0/own", "0/empty", "0.5/own", "0.5/empty"}
    assert set(summary[summary["probe"] == "inversion"]["setting"]) == {"learned", "untrained"}
    assert set(summary[summary["probe"] == "guidance"]["setting"]) == {"0.4/own", "0.4/empty"}
    erased = summary[summary["edit"] == "cad-erase"].set_index(["probe", "setting"])
    unedited = summary[summary["edit"] == "none"].set_index(["probe", "setting"])["recovery"]
    assert (erased["unedited"] == unedited.reindex(erased.index)).all()
    # strength 0 returns the unedited model's own sevens, whatever the edit
    assert erased.loc[("completion", "0/empty"), "recovery"] == unedited[("completion", "0/empty")]
    images = pd.read_parquet(Path(root) / "probes")
    assert len(images) == 3 * (2 * 4 + 4 * 4 + 2 * 4)
    verdicts = pd.read_parquet(Path(root) / "probe_verdicts")
    assert list(verdicts["edit"]) == ["cad-erase"]

    again = run_evaluation(config, root, local=True, progress=False)["probes"]
    assert again["units_computed"] == 0
    # the target's start images are drawn once into _probe_images/; a unit made again in a new worker reads
    # them there (not drawn again) and makes the same images as the first, which drew them
    starts = sorted((Path(root) / "_probe_images").glob("*.parquet"))
    assert len(starts) == 1  # one target
    written = starts[0].stat().st_mtime_ns
    parts = sorted((Path(root) / "_probes").glob("*.parquet"))
    completion = next(p for p in parts if pd.read_parquet(p, columns=["probe", "edit"]).iloc[0].tolist()
                      == ["completion", "cad-erase"])  # its strength-0 images are the start images themselves
    completion.unlink()
    with monkeypatch.context() as patched:
        patched.setattr("cad_ray.stages.probing.concept_images", lambda *a, **k: pytest.fail("drawn again"))
        third = run_evaluation(config, root, local=True, progress=False)["probes"]
    assert third["units_computed"] == 1
    assert starts[0].stat().st_mtime_ns == written
    pd.testing.assert_frame_equal(pd.read_parquet(Path(root) / "probes"), images)
    # no image depends on the margin or on the other targets' references: changing them makes nothing again
    probe = {**PROBE_EVALUATION["probe"], "margin": 1.0, "references": {"seven": str(NEVER_THREE),
                                                                        "three": str(NEVER_THREE)}}
    wider = small_config(evaluation={**PROBE_EVALUATION, "probe": probe})
    fourth = run_evaluation(wider, root, local=True, progress=False)["probes"]
    assert fourth["units_computed"] == 0
    assert pd.read_parquet(Path(root) / "probe_summary")["within"].dropna().all()  # margin 1: all within

    from cad_ray.stages.report import build_report, probe_table

    table = probe_table(summary[summary["target"] == "seven"])  # what the report shows: edit x probe setting
    assert list(table.iloc[:, 0]) == ["none", "never-learned", "cad-erase 0.05"]
    assert table.set_index(table.columns[0]).loc["none", "completion 0/empty"] == \
        round(100 * unedited[("completion", "0/empty")])
    assert "Is it gone? Completeness probes" in build_report(root) and "never-learned" in build_report(root)


def test_adversarial_unlearning_moves_only_the_selected_components(digits_model):
    """cad-finetune as adversarial unlearning: the components outside the selection keep their values, the
    selected ones move, and the model is handed back as it was."""
    from cad_ray.digits.concepts import digits_concept
    from cad_ray.method.objectives import Concept
    from cad_ray.method.unlearning import UnlearningSettings, adversarial_finetune

    prompts, bases, _ = digits_concept("three")
    concept = Concept("three", tuple(prompts), tuple(bases), None)
    before = {n: p.detach().clone() for n, p in digits_model.named_parameters()}
    name = next(n for n in before if n.endswith("attn2.to_k.weight"))
    masks = {name: np.zeros(tuple(before[name].shape), dtype=bool)}
    masks[name][:4] = True
    settings = UnlearningSettings(rounds=2, steps=2, images=4, retain_images=2, batch=4,
                                  attack=ProbeSettings(steps=2, batch=4), sampling_steps=4)
    other = next(n for n in before if n.endswith("ff.net.2.weight"))
    masks[other] = np.zeros(tuple(before[other].shape), dtype=bool)
    masks[other][:, :3] = True
    weights = adversarial_finetune(digits_model, concept, "three", {"eight": all_prompts(8, None)}, "ff+attn2",
                                   masks, settings, seed=0)
    moved = (weights[name] != before[name]).cpu().numpy()
    assert moved[:4].any() and not moved[4:].any()
    assert (weights[other] != before[other]).any() and torch.equal(weights[other][:, 3:], before[other][:, 3:])
    assert all(torch.equal(weights[n], before[n]) for n in weights if n not in (name, other))
    assert all(torch.equal(p, before[n]) for n, p in digits_model.named_parameters())


def test_guidance_steers_a_stable_diffusion_pipeline_through_its_vae(tiny_sd_folder):
    """The guidance probe on a tiny random Stable Diffusion pipeline: the judge's gradient reaches the latents
    through the VAE, so a judge that wants bright images gets brighter ones than plain sampling."""
    from cad_ray.method.probes import ClassifierGuidance
    from cad_ray.models import load_model

    model = load_model(tiny_sd_folder)

    def brightness(images, label):
        return images.mean(dim=(1, 2, 3)) * 1e4

    plain = ClassifierGuidance(brightness, "bright", 0.0).sample(model, ["a church"], 4, seed=0, steps=4).images
    steered = ClassifierGuidance(brightness, "bright", 1.0).sample(model, ["a church"], 4, seed=0, steps=4).images
    assert steered.mean() > plain.mean() + 0.01


def test_the_nearest_other_image_by_shape_draws_the_same_thing_in_another_colour():
    """The unlearning's `images` target for a colour: a blue bar's nearest other image by shape is the red bar,
    while by pixels (no channel shared) it is whichever other image has the least ink."""
    from cad_ray.method.unlearning import nearest_images

    def bar(channel, rows):
        image = -torch.ones(3, 8, 8)
        image[channel, rows, 2:6] = 1
        return image

    blue_bar = bar(2, slice(0, 8))[None]
    pool = torch.stack([bar(0, slice(0, 8)), bar(1, slice(3, 4))])  # a red bar; a short green stroke
    assert torch.equal(nearest_images(blue_bar, pool, "shape")[0], pool[0])
    assert torch.equal(nearest_images(blue_bar, pool, "pixels")[0], pool[1])


def test_the_references_are_probed_at_the_erasing_edits_guidance():
    """The unedited and never-learned units run at the guidance the erasing edits were judged at, not at an
    amplifying edit's that sorts first."""
    import pandas as pd
    from conftest import small_config

    from cad_ray.stages.probing import probe_units

    options = small_config(evaluation={"targets": ["seven"], "edits": ["cad-amplify", "cad-erase"],
                                       "probes": ["completion"]}).evaluation
    summary = pd.DataFrame({"edit": ["cad-amplify", "cad-erase"], "target": "seven", "selection": "s",
                            "ratio": 0.05, "guidance": [1.0, 3.0]})
    units = probe_units(summary, options)
    assert {u["guidance"] for u in units if u["edit"] == "none"} == {3.0}
    assert [u["edit"] for u in units] == ["cad-erase", "none"]
