import numpy as np
import pytest

from cad_ray.digits import (COLOUR_NAMES, DIGIT_WORDS, DigitsTokenizer, all_prompts, parse_prompt, real_digits,
                            render, split_indices, training_batch)
from cad_ray.errors import CadRayError


def test_real_digits_are_sklearns_and_render_in_colour():
    images, labels = real_digits()
    assert images.shape == (1797, 8, 8) and set(labels) == set(range(10))
    assert images.min() == 0.0 and images.max() == 1.0
    red = render(images[:5], "red")
    assert red.shape == (5, 8, 8, 3)
    np.testing.assert_array_equal(red[..., 0], images[:5])
    assert red[..., 1:].max() == 0.0
    np.testing.assert_array_equal(render(images[:5], "white").min(axis=-1), images[:5])


def test_split_is_disjoint_fixed_and_covers_everything():
    train, held = split_indices(1797)
    assert len(np.intersect1d(train, held)) == 0 and len(train) + len(held) == 1797
    np.testing.assert_array_equal(held, split_indices(1797)[1])


@pytest.mark.parametrize("prompt, digit, colour", [
    ("a red seven", 7, "red"), ("the digit 7 in blue", 7, "blue"), ("seven", 7, None), ("3", 3, None),
    ("", None, None), ("The Digit Zero in GREEN.", 0, "green")])
def test_prompt_grammar_parses(prompt, digit, colour):
    assert parse_prompt(prompt) == (digit, colour)


def test_grammar_covers_word_and_numeral_for_every_digit_and_colour():
    tokenizer = DigitsTokenizer()
    for d in range(10):
        for c in (None, *COLOUR_NAMES):
            prompts = all_prompts(d, c)
            assert any(DIGIT_WORDS[d] in p for p in prompts) and any(str(d) in p.split() for p in prompts)
            assert all(parse_prompt(p) == (d, c) for p in prompts)
            tokenizer(prompts)  # every grammar prompt is in the vocabulary


def test_tokenizer_pads_like_clip_and_empty_prompt_is_bos_eos():
    tok = DigitsTokenizer()
    ids = tok(["", "a red seven"])
    assert ids.shape == (2, tok.max_length)
    assert list(ids[0, :3]) == [tok.ids["<bos>"], tok.ids["<eos>"], tok.ids["<pad>"]]
    assert list(ids[1, :5]) == [tok.ids[w] for w in ("<bos>", "a", "red", "seven", "<eos>")]


def test_unknown_word_error_lists_the_vocabulary():
    with pytest.raises(CadRayError) as e:
        DigitsTokenizer()(["a purple seven"])
    message = str(e.value)
    assert "'purple'" in message and "seven" in message and "blue" in message and "\n" not in message


def test_training_batches_drop_prompts_for_guidance_and_match_their_images():
    rng = np.random.default_rng(0)
    images, prompts = training_batch(rng, 2000, np.arange(1797))
    assert images.shape == (2000, 8, 8, 3) and 0 <= images.min() and images.max() <= 1
    empty = np.mean([p == "" for p in prompts])
    assert 0.07 < empty < 0.13
    from cad_ray.digits.judges import builtin_judges

    colours = builtin_judges().colours(images)
    for k, p in enumerate(prompts):
        asked = parse_prompt(p)
        if asked.colour:
            assert COLOUR_NAMES[colours[k]] == asked.colour


def test_a_never_learned_reference_sees_no_image_in_a_left_out_colour():
    """jobs/train_digits.py --exclude red: no training image is drawn in red, whatever its prompt says."""
    from cad_ray.digits.judges import builtin_judges

    images, prompts = training_batch(np.random.default_rng(0), 1000, np.arange(1797),
                                     colours=("white", "green", "blue"))
    drawn = {COLOUR_NAMES[c] for c in builtin_judges().colours(images)}
    assert drawn == {"white", "green", "blue"}
    assert not any("red" in p for p in prompts)
    everything = training_batch(np.random.default_rng(0), 1000, np.arange(1797))[0]
    assert "red" in {COLOUR_NAMES[c] for c in builtin_judges().colours(everything)}
