"""The chunk size that fits (issue 11): chunk_size "auto", and a CUDA out-of-memory halves the chunk and retries.

The out-of-memory is faked: `point_values`, which the CAD estimator calls once per forward/backward pass, is
wrapped so that a pass over more than `limit` points raises torch.cuda.OutOfMemoryError, as an allocator with
that much memory would; before raising it fills the gradients with garbage, as a backward pass that ran out of
memory halfway would leave them.
"""

import logging

import pytest
import torch
from conftest import small_config, untrained_float64_model

import cad_ray.method.attribution as attribution
from cad_ray.errors import CadRayError
from cad_ray.method.attribution import AUTO_CHUNK_START, CAD, DEFAULT_CHUNK, resolve_chunk_size
from cad_ray.method.objectives import Concept, EraseObjective

CONCEPT = Concept("seven", ("seven", "a 7"))
SAMPLES = 2  # one group of 2 samples (batch 4) x 4 steps: 8 points


@pytest.fixture(scope="module")
def small_model():
    return untrained_float64_model(seed=7)


class FakeAllocator:
    """point_values that runs out of memory above `limit` points (a limit that may change after some passes)."""

    def __init__(self, model, limit: int, first_limit: int | None = None, first_passes: int = 0):
        self.model, self.limit, self.first_limit, self.first_passes = model, limit, first_limit, first_passes
        self.passes, self.failures, self.sizes = 0, 0, []
        self.real = attribution.point_values

    def __call__(self, model, points, target=None):
        limit = self.first_limit if self.passes < self.first_passes else self.limit
        if len(points) > limit:
            self.failures += 1
            for _, p in self.model.named_parameters():
                if p.requires_grad:
                    p.grad = torch.full_like(p, 1e6)  # what half a backward pass might have left behind
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory (fake: {len(points)} points > {limit})")
        self.passes += 1
        self.sizes.append(len(points))
        return self.real(model, points, target)


def cad(model, chunk_size, fused=False):
    return CAD(model, EraseObjective(steps=4, fused=fused), "ff", chunk_size=chunk_size)


def assert_same_scores(a, b):
    assert list(a.scores) == list(b.scores)
    for name in a.scores:
        torch.testing.assert_close(a.scores[name], b.scores[name], rtol=1e-9, atol=1e-15)
    assert a.objective_value == pytest.approx(b.objective_value, rel=1e-9)


def test_out_of_memory_halves_the_chunk_until_it_fits(small_model, monkeypatch, caplog):
    reference = cad(small_model, 4).attribute(CONCEPT, SAMPLES)
    estimator = cad(small_model, resolve_chunk_size("auto", "cuda"))  # where "auto" starts on a GPU
    assert estimator.chunk_size == AUTO_CHUNK_START == 256
    fake = FakeAllocator(small_model, limit=5)
    monkeypatch.setattr(attribution, "point_values", fake)
    with caplog.at_level(logging.WARNING, logger="cad_ray"):
        result = estimator.attribute(CONCEPT, SAMPLES)
    assert estimator.chunk_size == 4  # 256 -> 128 -> 64 -> 32 -> 16 -> 8 -> 4: the largest halving <= 5
    assert fake.failures == 6 and fake.sizes == [4, 4]
    warnings = [r for r in caplog.records if r.name == "cad_ray" and r.levelno == logging.WARNING]
    assert len(warnings) == 6 and "halving the chunk to 4 points" in warnings[-1].getMessage()
    assert_same_scores(result, reference)  # the garbage gradients of the failed passes reached nothing

    # the estimator keeps the size that fitted: later groups and shards do not run out of memory again
    fake.failures = 0
    again = estimator.attribute(CONCEPT, SAMPLES)
    assert fake.failures == 0 and estimator.chunk_size == 4
    assert_same_scores(again, reference)


def test_out_of_memory_in_the_middle_of_a_group_counts_no_point_twice(small_model, monkeypatch):
    reference = cad(small_model, 100).attribute(CONCEPT, SAMPLES)
    estimator = cad(small_model, 4)
    # the first pass (points 0-3) fits, then memory shrinks: points 4-7 are redone in chunks of 2
    fake = FakeAllocator(small_model, limit=2, first_limit=4, first_passes=1)
    monkeypatch.setattr(attribution, "point_values", fake)
    result = estimator.attribute(CONCEPT, SAMPLES)
    assert estimator.chunk_size == 2 and fake.failures == 1 and fake.sizes == [4, 2, 2]
    assert_same_scores(result, reference)


def test_out_of_memory_in_the_fused_passes_falls_back_to_separate_passes(small_model, monkeypatch, caplog):
    reference = cad(small_model, 8).attribute(CONCEPT, SAMPLES)
    estimator = cad(small_model, 8, fused=True)
    real, calls = EraseObjective.fused_backward, []

    def fused_backward(self, model, concept, samples, seed, backward):
        def failing(values, weights):  # the third step's backward pass runs out of memory, after two went through
            calls.append(len(values))
            if len(calls) == 3:
                for _, p in small_model.named_parameters():
                    if p.requires_grad:
                        p.grad = torch.full_like(p, 1e6)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (fake)")
            backward(values, weights)
        return real(self, model, concept, samples, seed, failing)

    monkeypatch.setattr(EraseObjective, "fused_backward", fused_backward)
    with caplog.at_level(logging.WARNING, logger="cad_ray"):
        result = estimator.attribute(CONCEPT, SAMPLES)
    assert len(calls) == 3 and not estimator.fuse  # later groups and shards use the separate passes
    assert any("fused passes" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert_same_scores(result, reference)  # the two steps before the failure and its garbage counted for nothing


def test_no_memory_for_a_single_point_is_a_clear_error(small_model, monkeypatch):
    estimator = cad(small_model, 4)
    monkeypatch.setattr(attribution, "point_values", FakeAllocator(small_model, limit=0))
    with pytest.raises(CadRayError, match="out of device memory even with one point per pass") as error:
        estimator.attribute(CONCEPT, SAMPLES)
    assert "\n" not in str(error.value)
    assert all(p.grad is None for _, p in small_model.named_parameters())  # nothing left behind


def test_auto_is_the_default_and_resolves_to_a_number():
    config = small_config()
    assert config.chunk_size == "auto"
    assert small_config(chunk_size="auto").chunk_size == "auto" and small_config(chunk_size=16).chunk_size == 16
    assert resolve_chunk_size("auto", "cpu") == DEFAULT_CHUNK == 64
    assert resolve_chunk_size("auto", torch.device("cuda", 0)) == AUTO_CHUNK_START
    assert resolve_chunk_size("auto") == DEFAULT_CHUNK  # passes without the fallback: the same on any device
    assert resolve_chunk_size(16, "cuda") == 16
    model = untrained_float64_model(seed=1)  # on CPU
    assert CAD(model, EraseObjective(steps=2), "ff", chunk_size=config.chunk_size).chunk_size == 64


@pytest.mark.parametrize("value", [0, -3, "big", 2.5, True, None])
def test_a_bad_chunk_size_is_a_one_line_error(value):
    with pytest.raises(CadRayError) as error:
        small_config(chunk_size=value)
    message = str(error.value)
    assert "\n" not in message and "chunk_size" in message and "'auto'" in message, message
    with pytest.raises(CadRayError, match="chunk_size must be a whole number >= 1 or 'auto'"):
        resolve_chunk_size(value)
