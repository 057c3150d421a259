"""The distributed jobs (attribution, validation): Ray actors that load the model once and compute shards.

Thin by design: planning, computing, reducing and writing live in cad_ray.run and cad_ray.validation_run;
this module only places those calls on actors (one GPU each where the cluster has GPUs, one CPU each otherwise), bounds the work in
flight, moves work off dead workers and shows progress.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict, deque

from .config import AttributionConfig
from .errors import CadRayError
from .run import (AttributionWorker, RunRoot, mark_complete, open_run, pairs_to_finalize, plan_shards,
                  shard_status)

IN_FLIGHT_PER_WORKER = 2
CPU_WORKER_THREADS = 1  # float results depend on torch's thread count; all CPU workers use the same


class WorkerHost:
    """What a Ray actor holds: a stage's worker (`worker_class(config, root)`), built on the first call so that
    its errors (a missing model, an unknown prompt word) come back as the task's exception, not a dead actor."""

    def __init__(self, worker_class, config: AttributionConfig, root: str, threads: int | None = None):
        self.worker_class, self.config, self.root, self.threads, self.worker = worker_class, config, root, threads, None

    def call(self, method: str, *args):
        import torch

        previous = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            if self.worker is None:
                self.worker = self.worker_class(self.config, self.root)
            return getattr(self.worker, method)(*args)
        finally:
            torch.set_num_threads(previous)


def _unwrap(error: Exception) -> Exception:
    """The user-facing error inside a Ray task error, if there is one."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, CadRayError) else error


class _LocalPool:
    """The same calls, in this process (for tests and for measuring Ray's overhead), with the thread count
    of a CPU Ray worker so that both give the same numbers."""

    def __init__(self, worker_class, config, root):
        self.host = WorkerHost(worker_class, config, root, threads=CPU_WORKER_THREADS)
        self.size, self.lost = 1, 0

    def first(self, method, *args):
        return self.host.call(method, *args)

    def close(self):
        self.host = None

    def map(self, calls):
        for key, method, args in calls:
            yield key, self.host.call(method, *args)


class _RayPool:
    """Actors that each load the model once. Work goes only to actors that have loaded it: an actor Ray cannot
    place (its node is gone, or the cluster still counted a lost node's GPU) waits in `starting` and never
    holds work. A task whose actor dies (a lost node, a crashed worker) is put back in the queue for the other
    actors, and a replacement actor is started. Shard work is idempotent (it rewrites the same file), so a rerun
    is harmless."""

    READY = "fingerprint"  # the call that loads the model; its answer is kept, as it is also the first question
    WAIT_NOTICE_SECONDS = 60

    def __init__(self, worker_class, config: AttributionConfig, root: str, address: str | None):
        import ray

        if not ray.is_initialized():
            # no address: a new local instance, even where another one runs on this machine ("local"); Ray's
            # own default would join the latest local cluster and compete for its resources
            ray.init(address=address or "local", log_to_driver=False,
                     include_dashboard=False if address is None else None, configure_logging=False)
        self.ray = ray
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        self.size = max(1, config.workers or (gpus if gpus else cpus))
        # one GPU per actor; on CPUs a share of the CPUs so that every requested actor can start
        self.request = {"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": min(1.0, cpus / self.size)}
        self.remote = ray.remote(max_restarts=0, **self.request)(WorkerHost)
        self.args = (worker_class, config, root, None if gpus else CPU_WORKER_THREADS)
        self.actors = []  # placed and holding the model: the only ones that get work
        self.starting = {}  # readiness ref -> actor, until it has loaded the model
        self.ready_answer = None
        self.replacements_left, self.lost = 4 * self.size, 0
        for _ in range(self.size):
            self._start_actor()

    def _start_actor(self):
        actor = self.remote.remote(*self.args)
        self.starting[actor.call.remote(self.READY)] = actor

    def _replace(self) -> None:
        """A replacement for an actor that died, while the budget lasts (a worker that dies for a reason of its
        own would otherwise be restarted forever)."""
        self.lost += 1
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self._start_actor()

    def _admit(self, ref) -> None:
        """An actor's readiness call finished: it joins the pool, or is replaced if it died on the way (placed on
        a node that was dying: Ray takes some seconds to notice a node that is gone)."""
        actor = self.starting.pop(ref)
        try:
            self.ready_answer = self.ray.get(ref)
            self.actors.append(actor)
        except self.ray.exceptions.RayActorError:
            self._replace()
        except Exception as e:  # the worker itself failed (a missing model, an unknown prompt word)
            raise _unwrap(e) from None

    def _wait(self, refs: list):
        """ray.wait for one of `refs`. While no actor is ready it says, once a minute, that actors wait for
        resources (an autoscaling cluster may still be adding the nodes; a hand-made one may lack them)."""
        while True:
            ready, _ = self.ray.wait(refs, num_returns=1, timeout=self.WAIT_NOTICE_SECONDS)
            if ready:
                return ready
            if not self.actors:
                print(f"cad-ray: waiting for Ray to place {len(self.starting)} worker(s) asking for "
                      f"{self.request}; see `ray status`", file=sys.stderr, flush=True)

    def close(self):
        """Stop the actors, so that their CPUs or GPUs are free for the next stage."""
        for actor in self.actors + list(self.starting.values()):
            self.ray.kill(actor)  # actors still waiting for resources too: they would take them later
        self.actors, self.starting = [], {}

    def first(self, method, *args):
        """One call on an actor that has loaded the model."""
        while True:
            while not self.actors:
                if not self.starting:
                    raise CadRayError(f"every Ray worker died before it could load the model ({self.lost} tried); "
                                      "see the Ray logs")
                self._admit(self._wait(list(self.starting))[0])
            if method == self.READY and not args:
                return self.ready_answer
            actor = self.actors[0]
            try:
                return self.ray.get(actor.call.remote(method, *args))
            except self.ray.exceptions.RayActorError:
                self.actors.remove(actor)
                self._replace()
            except Exception as e:
                raise _unwrap(e) from None

    def map(self, calls):
        """Run calls on the ready actors with at most IN_FLIGHT_PER_WORKER each; yield (key, result) as they
        finish."""
        queue = deque(calls)
        running = {}  # object ref -> (call, actor)
        load = defaultdict(int)
        while queue or running:
            while queue and self.actors and len(running) < IN_FLIGHT_PER_WORKER * len(self.actors):
                actor = min(self.actors, key=lambda a: load[a])
                call = queue.popleft()
                running[actor.call.remote(call[1], *call[2])] = (call, actor)
                load[actor] += 1
            if not running and not self.starting:
                raise CadRayError("every Ray worker died and no replacement could be started; see the Ray logs")
            ready = self._wait(list(running) + list(self.starting))[0]
            if ready in self.starting:
                self._admit(ready)
                continue
            call, actor = running.pop(ready)
            load[actor] -= 1
            try:
                result = self.ray.get(ready)
            except self.ray.exceptions.RayActorError:
                queue.appendleft(call)
                if actor in self.actors:
                    self.actors.remove(actor)
                    self._replace()
                continue
            except Exception as e:
                raise _unwrap(e) from None
            yield call[0], result


def worker_pool(worker_class, config: AttributionConfig, root: str, address: str | None, local: bool):
    return _LocalPool(worker_class, config, root) if local else _RayPool(worker_class, config, root, address)


def run_attribution(config: AttributionConfig, root: str, address: str | None = None, overwrite: bool = False,
                    local: bool = False, progress: bool = True) -> dict:
    """Compute (or resume) every shard, reduce and write the tables; returns the completed manifest."""
    from tqdm.auto import tqdm

    run = RunRoot(root)
    run.check_writable()
    pool = worker_pool(AttributionWorker, config, root, address, local)
    started = time.time()
    fingerprint = pool.first("fingerprint")  # the first call loads the model
    setup_seconds = time.time() - started
    manifest = open_run(config, root, fingerprint, overwrite)
    layout = pool.first("tensor_layout")
    shards = plan_shards(config)
    done, pending = shard_status(run, shards, manifest, layout)
    bar = tqdm(total=len(shards), initial=len(done), unit="shard", desc="attribution", disable=not progress)
    samples = 0
    for _, result in pool.map([(s, "run_shard", (s,)) for s in pending]):
        samples += result["samples"]
        bar.update(1)
        bar.set_postfix(samples_per_s=f"{samples / max(time.time() - started, 1e-9):.2f}")
    bar.close()
    by_pair = defaultdict(list)
    for shard in shards:
        by_pair[(shard.concept, shard.objective)].append(shard)
    todo = pairs_to_finalize(run, config)
    results = [r for _, r in pool.map([(p, "finalize", (*p, by_pair[p], manifest)) for p in todo])]
    pool.close()
    manifest = mark_complete(run, manifest, results)
    manifest["run_seconds"] = time.time() - started
    manifest["setup_seconds"] = setup_seconds  # Ray start-up and model loading
    manifest["shards_computed"] = len(pending)
    manifest["shards_skipped"] = len(done)
    manifest["workers"] = pool.size
    manifest["workers_lost"] = pool.lost
    return manifest


def run_validation(config: AttributionConfig, root: str, address: str | None = None, overwrite: bool = False,
                   local: bool = False, progress: bool = True) -> dict:
    """Random-ablation validation of a completed attribution run (config.validation says what to draw)."""
    from tqdm.auto import tqdm

    from .validation_run import (ValidationWorker, finish_validation, open_validation, plan_validation,
                                 shard_is_done)

    run = RunRoot(root)
    run.check_writable()
    shards = plan_validation(config, config.validation)  # checks the concepts before Ray starts
    pool = worker_pool(ValidationWorker, config, root, address, local)
    started = time.time()
    manifest = open_validation(config, root, pool.first("fingerprint"), overwrite)
    pending = [s for s in shards if not shard_is_done(run, s, manifest)]
    bar = tqdm(total=len(shards), initial=len(shards) - len(pending), unit="shard", desc="validation",
               disable=not progress)
    # sketches first: each is one long task, so they start while the short ablation blocks fill the gaps
    pending.sort(key=lambda s: s.kind != "sketch")
    for _ in pool.map([(s, "run_shard", (s,)) for s in pending]):
        bar.update(1)
    bar.close()
    pool.close()
    result = finish_validation(config, root, manifest)
    result.update(run_seconds=time.time() - started, shards_computed=len(pending),
                  shards_skipped=len(shards) - len(pending), workers=pool.size)
    return result


def run_evaluation(config: AttributionConfig, root: str, address: str | None = None, local: bool = False,
                   progress: bool = True, overwrite: bool = False) -> dict:
    """Make the fine-tuned edits (actors), then generate and judge every row with Ray Data (`map_batches` on an
    actor pool, a GPU per actor where there are GPUs) and write evaluation/ and evaluation_summary/."""
    import numpy as np
    import pandas as pd
    import pyarrow as pa
    from tqdm.auto import tqdm

    from .evaluation import (EditWorker, ImageJudge, digits_prompt_set, edit_folder, evaluation_metadata,
                             evaluation_options_hash, plan_rows, read_prompt_set, real_features, summarize_evaluation)
    from .store import ScoreStore

    options = config.evaluation
    run = RunRoot(root)
    run.check_writable()
    store = ScoreStore(root)
    if store.manifest["config_hash"] != config.config_hash():
        raise CadRayError(f"--config describes another attribution run than the one in {root}")
    known = {(c, o) for c, o in store.concepts().itertuples(index=False)}
    for target in options.targets:
        for edit in options.edits:
            objective = "amplify" if edit == "cad-amplify" else "erase"
            if edit != "finetune" and (target, objective) not in known:
                raise CadRayError(f"edit {edit} of {target!r} needs {objective} scores for it in {root}; "
                                  f"the run has {', '.join(sorted(f'{c}/{o}' for c, o in known))}")
    prompts = read_prompt_set(options.prompts) if options.prompts else digits_prompt_set(options.images_per_prompt,
                                                                                         options.seed)
    started = time.time()
    pool = worker_pool(EditWorker, config, root, address, local)
    guidance = pool.first("default_guidance")
    if options.guidance is None:
        config = config.model_copy(update={"evaluation": options.model_copy(update={"guidance": guidance})})
        options = config.evaluation
    todo = [(e, t) for t in options.targets for e in ("finetune", "cad-finetune")
            if (e in options.edits or (e == "finetune" and "finetune+cad-amplify" in options.edits))
            and not run.exists(*edit_folder(e, t), "model", "model_index.json")]
    with tqdm(total=len(todo), unit="edit", desc="fine-tuned edits", disable=not progress or not todo) as bar:
        for _ in pool.map([((e, t), "make", (e, t)) for e, t in todo]):
            bar.update(1)
    pool.close()
    rows = plan_rows(options, prompts)
    # rows are judged in blocks; each finished block is written at once (like attribution shards), so a killed
    # driver loses only the blocks in flight, and a re-run skips the rest
    rows["block"] = np.arange(len(rows)) // options.batch_size
    sizes = rows.groupby("block").size().to_dict()
    block_meta = {"options_hash": options.options_hash(), "fingerprint": store.fingerprint}
    if not overwrite and run.exists("evaluation", "part-0.parquet"):
        previous = evaluation_options_hash(run)
        if previous is not None and previous != block_meta["options_hash"]:
            raise CadRayError(f"{root} holds an evaluation made with other options; pass --overwrite to replace it "
                              "or evaluate into a copy of the root")
    pending = [b for b in sizes if not _evaluation_block_done(run, b, sizes[b], block_meta)]
    todo_rows = rows[rows["block"].isin(pending)]
    bar = tqdm(total=len(sizes), initial=len(sizes) - len(pending), unit="block", desc="images",
               disable=not progress)

    def save(frame):
        for block, group in frame.groupby("block"):
            run.write_table(pa.Table.from_pandas(group, preserve_index=False), *_evaluation_block(block),
                            metadata=dict(block_meta, rows=int(sizes[block])))
            bar.update(1)

    actors = 1
    if pending and local:
        judge = ImageJudge(config, root, threads=CPU_WORKER_THREADS)
        for block in pending:
            save(judge(todo_rows[todo_rows["block"] == block]))
    elif pending:
        import ray

        ray.data.DataContext.get_current().enable_progress_bars = False  # ours counts the blocks
        resources = ray.cluster_resources()
        gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
        actors = max(1, config.workers or (gpus if gpus else cpus))
        # on CPUs the actors leave a little CPU for Ray Data's own tasks, which would otherwise wait forever
        request = {"num_gpus": 1} if gpus else {"num_cpus": min(1.0, 0.9 * cpus / actors)}
        dataset = ray.data.from_pandas([todo_rows[todo_rows["block"] == b] for b in pending])
        judged = dataset.map_batches(ImageJudge, fn_constructor_kwargs={
            "config": config, "root": root, "threads": None if gpus else CPU_WORKER_THREADS},
            batch_size=options.batch_size, batch_format="pandas",
            # at least one actor, not all: the GPU count can still include a node that was just lost, and Ray
            # Data would wait forever for an actor it cannot place; the others start as Ray places them
            compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors, initial_size=actors), **request)
        waiting = {}
        for batch in judged.iter_batches(batch_format="pandas", batch_size=None):
            for block, group in batch.groupby("block"):
                waiting[block] = pd.concat([waiting[block], group]) if block in waiting else group
                if len(waiting[block]) == sizes[block]:
                    save(waiting.pop(block))
    bar.close()
    table = pd.concat([run.read_table(*_evaluation_block(b)).to_pandas() for b in sorted(sizes)])
    table = table.drop(columns=["block"])
    key = ["edit", "target", "ratio", "guidance", "label", "prompt", "seed"]
    table = table.sort_values(key, kind="stable").reset_index(drop=True)
    # the Frechet distance's reference is the real digits; other models' quality needs a reference set of theirs
    reference = real_features() if "features" in table and store.manifest.get("model") == "builtin:digits" else None
    summary = summarize_evaluation(table, reference)
    meta = evaluation_metadata(store.manifest, options)
    stored = table.drop(columns=[c for c in ("features",) if c in table])
    run.write_table(pa.Table.from_pandas(stored, preserve_index=False), "evaluation", "part-0.parquet", metadata=meta)
    run.write_table(pa.Table.from_pandas(summary, preserve_index=False), "evaluation_summary", "part-0.parquet",
                    metadata=meta)
    return {"summary": summary, "images": len(table), "actors": actors, "run_seconds": time.time() - started,
            "edits_made": len(todo), "blocks_computed": len(pending), "blocks_skipped": len(sizes) - len(pending)}


def _evaluation_block(block: int) -> tuple[str, str]:
    return ("_evaluation", f"block-{int(block):06d}.parquet")


def _evaluation_block_done(run: RunRoot, block: int, rows: int, meta: dict) -> bool:
    """A block file counts only if it is whole (footer), has its rows, and was made with these options and model."""
    import json

    import pyarrow.parquet as pq

    from .store import METADATA_KEY

    try:
        with run.fs.open(run.join(*_evaluation_block(block)), "rb") as f:
            footer = pq.read_metadata(f)
        stored = json.loads(footer.metadata[METADATA_KEY])
    except Exception:
        return False
    return footer.num_rows == rows and all(stored.get(k) == v for k, v in meta.items())
