import numpy as np

from cad_ray.digits import COLOUR_NAMES, real_digits, render, split_indices
from cad_ray.digits.judges import builtin_judges, frechet_distance


def test_digit_judge_is_accurate_on_held_out_real_digits_in_every_colour():
    images, labels = real_digits()
    _, held = split_indices(len(labels))
    judges = builtin_judges()
    for colour in COLOUR_NAMES:
        accuracy = (judges.digits(render(images[held], colour)) == labels[held]).mean()
        assert accuracy >= 0.95, (colour, accuracy)


def test_colour_judge_names_the_colour_of_held_out_digits():
    images, labels = real_digits()
    _, held = split_indices(len(labels))
    judges = builtin_judges()
    for i, colour in enumerate(COLOUR_NAMES):
        assert (judges.colours(render(images[held], colour)) == i).mean() >= 0.99


def test_frechet_distance_is_zero_for_same_features_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 8))
    assert abs(frechet_distance(a, a)) < 1e-6
    assert frechet_distance(a, a + 1.0) > frechet_distance(a, a + 0.1) > 0
