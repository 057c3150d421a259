"""The built-in digits model draws what it is asked for, by the independent judges' verdict."""

from cad_ray.digits import COLOUR_NAMES, canonical_prompt
from cad_ray.digits.quality import judge_samples, quality_summary


def test_fixed_seed_samples_are_judged_the_right_digit_and_colour(digits_model):
    # 4 images per digit, one in each colour, default sampler and guidance
    prompts = [canonical_prompt(d, c) for d in range(10) for c in COLOUR_NAMES]
    summary = quality_summary(judge_samples(digits_model, prompts, seed=2024))
    assert summary["digit_accuracy"] >= 0.85, summary
    assert summary["worst_digit_accuracy"] >= 0.5, summary
    assert summary["colour_accuracy"] >= 0.9, summary


def test_guidance_matters_unconditional_samples_are_not_the_asked_digit(digits_model):
    prompts = [canonical_prompt(7, c) for c in COLOUR_NAMES] * 5
    guided = quality_summary(judge_samples(digits_model, prompts, seed=7))
    unconditional = quality_summary(judge_samples(digits_model, prompts, seed=7, guidance=0.0))
    assert guided["digit_accuracy"] > unconditional["digit_accuracy"] + 0.3
