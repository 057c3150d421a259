"""Several concepts' erase trajectories in one sampler call (`concept_batch`): each concept still gets its own
scores, the same as attributed alone, and a run gives the same tables however it was stopped."""

import shutil
import sys

import pytest
import torch
from conftest import small_config, untrained_float64_model
from test_attribute_job import assert_same_scores, table

from cad_ray.distributed import run_attribution
from cad_ray.method.attribution import CAD
from cad_ray.method.objectives import Concept, EraseObjective
from cad_ray.stages.attribution import concept_stacks, plan_shards

CONCEPTS = [Concept("seven", ("seven", "a 7")), Concept("three", ("three",)), Concept("one", ("one", "a 1", "1"))]


@pytest.fixture(scope="module")
def small_model():
    return untrained_float64_model(seed=7)


def sampler_calls(model, monkeypatch) -> list[int]:
    """The batch size of every sampler call from now on."""
    calls, sample = [], model.sample
    monkeypatch.setattr(model, "sample", lambda prompts, **kw: calls.append(len(prompts)) or sample(prompts, **kw))
    return calls


@pytest.mark.parametrize("scope, points", [("ff", 3), ("attn2", None), ("linear", 2)])
def test_stacked_concepts_get_the_scores_each_gets_alone(small_model, monkeypatch, scope, points):
    """One sampler call per batch of samples for all three concepts, and each concept's gradient and J equal its
    own run's (float64: to rounding). attn2 has weights that read only the prompt (to_k, to_v): their rows are
    split too. The chunk (9 rows) is less than a step's stacked rows times the steps, so backward passes take
    several steps' points of all concepts."""
    objective = EraseObjective(steps=4, points_per_sample=points, fused=True)
    samples = [0, 1, 2]
    alone = [CAD(small_model, objective, scope, chunk_size=9, batch=2).gradient_sum(c, samples) for c in CONCEPTS]
    calls = sampler_calls(small_model, monkeypatch)
    stacked = CAD(small_model, objective, scope, chunk_size=9, batch=2).gradient_sums([(c, samples) for c in CONCEPTS])
    assert calls == [6, 3]  # batches {0, 1} and {2} of the sample grid, the three concepts in each
    for a, b in zip(alone, stacked):
        assert b.samples == 3 and b.objective_sum == pytest.approx(a.objective_sum, rel=1e-12)
        for name in a.grads:
            torch.testing.assert_close(b.grads[name], a.grads[name], rtol=1e-9, atol=1e-14)
        assert any(g.abs().max() > 0 for g in b.grads.values())


@pytest.mark.parametrize("scope, base, chunk", [("tokens+ff", "", 9), ("ff", "a digit", 9), ("ff", "", 5)])
def test_concepts_that_cannot_be_stacked_are_attributed_one_at_a_time(small_model, monkeypatch, scope, base, chunk):
    """Text-encoder components, a base prompt other than the sampler's negative one, or more stacked rows than a
    chunk: each concept alone, with the same scores as alone."""
    concepts = [Concept(c.name, c.prompts, (base,)) for c in CONCEPTS[:2]]
    objective = EraseObjective(steps=3, points_per_sample=2, fused=True)
    alone = [CAD(small_model, objective, scope, chunk_size=chunk, batch=3).gradient_sum(c, [0, 1, 2])
             for c in concepts]
    calls = sampler_calls(small_model, monkeypatch)
    both = CAD(small_model, objective, scope, chunk_size=chunk, batch=3).gradient_sums([(c, [0, 1, 2])
                                                                                       for c in concepts])
    assert max(calls) == 3  # never two concepts' batches in one call
    for a, b in zip(alone, both):
        for name in a.grads:
            torch.testing.assert_close(b.grads[name], a.grads[name], rtol=0, atol=0)


def test_a_layer_that_folds_images_into_rows_falls_back_to_one_at_a_time(small_model, monkeypatch):
    """A scoped Linear that sees other rows than the pass's images (here a feed-forward block that folds its
    images into one row of tokens, which changes nothing else) cannot be split by concept: the stacked pass is
    dropped, nothing of it counts, and each concept is attributed alone, in this call and the next."""
    objective = EraseObjective(steps=3, points_per_sample=2, fused=True)
    estimator = CAD(small_model, objective, "ff", chunk_size=64, batch=2)
    alone = [estimator.gradient_sum(c, [0, 1]) for c in CONCEPTS]
    ff = dict(small_model.unet.named_modules())[estimator.tensor_names[0].split(".ff.")[0] + ".ff"]
    forward = ff.forward
    monkeypatch.setattr(ff, "forward", lambda h, *a, **k: forward(h.reshape(1, -1, h.shape[-1]), *a, **k)
                        .reshape(h.shape))
    calls = sampler_calls(small_model, monkeypatch)
    stacked = estimator.gradient_sums([(c, [0, 1]) for c in CONCEPTS])
    assert calls == [6, 2, 2, 2]
    for a, b in zip(alone, stacked):
        for name in a.grads:
            torch.testing.assert_close(b.grads[name], a.grads[name], rtol=1e-9, atol=1e-14)
    calls.clear()
    estimator.gradient_sums([(c, [0, 1]) for c in CONCEPTS])
    assert calls == [2, 2, 2]  # the estimator does not try again a stack that failed


def test_stacks_are_fixed_by_the_config():
    """Erase shards of one sample block, in groups of concept_batch of the config's erase concepts; amplify and
    an unfused erase alone."""
    concepts = [{"name": n, "objectives": ["erase", "amplify"]} for n in ("seven", "three", "one")]
    config = small_config(concepts=concepts, concept_batch=2, erase={"steps": 4, "fused": True})
    stacks = concept_stacks(config, plan_shards(config))
    erase = [[(s.concept, s.index) for s in stack] for stack in stacks if stack[0].objective == "erase"]
    assert erase == [[("seven", 0), ("three", 0)], [("seven", 1), ("three", 1)], [("one", 0)], [("one", 1)]]
    assert all(len(stack) == 1 for stack in stacks if stack[0].objective == "amplify")
    single = small_config(concepts=concepts, erase={"steps": 4, "fused": True})
    assert all(len(stack) == 1 for stack in concept_stacks(single, plan_shards(single)))
    assert "concept_batch" not in small_config().result_fields()
    assert config.config_hash() != small_config(concepts=concepts, erase={"steps": 4, "fused": True}).config_hash()


@pytest.mark.parametrize("changes, says", [
    ({"erase": {"steps": 4}}, "stacks fused erase trajectories only: set erase.fused: true"),
    ({"erase": {"fused": True}, "chunk_size": 3}, r"concept_batch x batch \(2 x 2\) rows must fit one chunk"),
])
def test_a_concept_batch_that_would_stack_nothing_is_refused(changes, says):
    from cad_ray.errors import CadRayError

    with pytest.raises(CadRayError, match=says):
        small_config(concept_batch=2, **changes)


def stacked_config(**changes):
    concepts = [{"name": n} for n in ("seven", "three", "one")]
    return small_config(**{"concepts": concepts, "concept_batch": 2, "samples": 2, "block": 2, "batch": 2,
                           "chunk_size": 64, "erase": {"steps": 4, "fused": True}, **changes})


def test_a_stacked_run_matches_one_concept_at_a_time_and_resumes_to_the_same_tables(tmp_path, monkeypatch):
    """The stage stacks seven and three (one call), one alone; the tables equal those of concept_batch 1 to
    float rounding. Stopped after seven's tables, the run resumes: three is computed in the same stack again
    (seven with it, not written), so its tables are those of the run that was never stopped, to the bit."""
    from cad_ray.stages.attribution_worker import AttributionWorker

    whole = str(tmp_path / "whole")
    stacked = []
    partial_sums = AttributionWorker.partial_sums
    monkeypatch.setattr(AttributionWorker, "partial_sums",
                        lambda self, shards: stacked.append([s.concept for s in shards]) or partial_sums(self, shards))
    run_attribution(stacked_config(), whole, local=True, progress=False)
    assert stacked == [["seven", "three"], ["one"]]
    alone = str(tmp_path / "alone")
    run_attribution(stacked_config(concept_batch=1), alone, local=True, progress=False)
    for concept in ("seven", "three", "one"):
        assert_same_scores(table(whole, concept=concept), table(alone, concept=concept), rel=1e-5)

    finalize = AttributionWorker.finalize

    def stop_after_seven(self, concept, objective, shards, manifest, **options):
        if concept != "seven":
            raise KeyboardInterrupt("stopped")
        return finalize(self, concept, objective, shards, manifest, **options)

    stopped = str(tmp_path / "stopped")
    monkeypatch.setattr(AttributionWorker, "finalize", stop_after_seven)
    with pytest.raises(KeyboardInterrupt):
        run_attribution(stacked_config(), stopped, local=True, progress=False)
    monkeypatch.setattr(AttributionWorker, "finalize", finalize)
    stacked.clear()
    run_attribution(stacked_config(), stopped, local=True, progress=False)
    assert stacked == [["seven", "three"], ["one"]]
    for concept in ("seven", "three", "one"):
        assert_same_scores(table(stopped, concept=concept), table(whole, concept=concept), rel=0)


def test_written_shards_of_a_stack_resume_to_the_same_tables(tmp_path):
    """With shard files (keep_shards), a lost shard of a stack is computed again with its stack-mates (which are
    not rewritten), and the tables are those of the first run, to the bit."""
    config = stacked_config(keep_shards=True, samples=4)
    root = tmp_path / "kept"
    run_attribution(config, str(root), local=True, progress=False)
    first = {c: table(str(root), concept=c) for c in ("seven", "three")}
    lost = root / "_shards" / "concept=three" / "objective=erase" / "shard-00001.parquet"
    kept = root / "_shards" / "concept=seven" / "objective=erase" / "shard-00001.parquet"
    before = kept.stat().st_mtime_ns
    lost.unlink()
    for name in ("scores", "neurons", "layers"):
        shutil.rmtree(root / name / "concept=three")
    result = run_attribution(config, str(root), local=True, progress=False)
    assert result["shards_computed"] == 1 and kept.stat().st_mtime_ns == before and lost.exists()
    for concept, frame in first.items():
        assert_same_scores(table(str(root), concept=concept), frame, rel=0)


@pytest.mark.parametrize("scheduler", ["DDPMScheduler", "EulerDiscreteScheduler"])
def test_stacked_concepts_on_a_stable_diffusion_pipeline(tmp_path, monkeypatch, scheduler):
    """A tiny SD pipeline with a stochastic sampler (DDPM: each step draws noise from each image's own generator)
    and a sigma-scaled one (Euler): a stacked trajectory draws its concept's noise, so each concept's gradient is
    its own run's, to float32 rounding."""
    from tiny_sd import build_tiny_sd

    from cad_ray.models import load_model

    model = load_model(str(build_tiny_sd(tmp_path / "sd", scheduler_class=scheduler)))
    concepts = [Concept(n, (f"an image of {n}",)) for n in ("tench", "church")]
    objective = EraseObjective(steps=3, points_per_sample=None, fused=True)
    alone = [CAD(model, objective, "ff", chunk_size=16, batch=2).gradient_sum(c, [0, 1]) for c in concepts]
    calls = sampler_calls(model, monkeypatch)
    stacked = CAD(model, objective, "ff", chunk_size=16, batch=2).gradient_sums([(c, [0, 1]) for c in concepts])
    assert calls == [4]
    for a, b in zip(alone, stacked):
        x = torch.cat([g.flatten() for g in a.grads.values()])
        y = torch.cat([g.flatten() for g in b.grads.values()])
        assert (x - y).abs().max() <= 1e-4 * x.abs().max()
    tench, church = (torch.cat([g.flatten() for g in part.grads.values()]) for part in alone)
    assert (tench - church).abs().max() > 1e-2 * tench.abs().max()  # the concepts' gradients differ far beyond that


class _LateSecondWorker:
    """A stage worker whose second instance takes a while to load (as a second actor that imports and loads the
    model later than the first); `unit` says which process ran it."""

    def __init__(self, config, root):
        import os
        import time

        marker = os.path.join(root, "first-loaded")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            time.sleep(2)

    def fingerprint(self):
        return "late"

    def unit(self, number):
        import os
        import time

        time.sleep(3)
        return os.getpid()


def test_a_few_large_units_go_one_to_each_worker(tmp_path):
    """Two units (two stacks of concepts) and two workers, the second ready 2 s after the first: the first does not
    take both (two at a time is the pipelining of many small units); each worker runs one."""
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    from cad_ray.distributed import Executor

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the Ray workers cannot import this test module
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    executor = Executor(small_config(workers=2), str(tmp_path), progress=False)
    try:
        pids = [pid for _, pid in executor.map(_LateSecondWorker, "unit", [0, 1], "units")]
    finally:
        executor.close()
        ray.shutdown()
        cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    assert len(set(pids)) == 2
