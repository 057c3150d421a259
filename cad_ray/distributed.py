"""The Ray layer: one driver that runs any stage's work units (shards, edits, blocks of images to make and
judge) on Ray actors that load the model once (one GPU each where the cluster has GPUs, a CPU share
otherwise), or in this process. Plain actors with `max_restarts=0`, not Ray Data's pool: a lost actor's work is
moved here and a replacement started, and Ray has no restart to warn about.

Thin by design: what a unit is, how it is computed and how a stage's tables are finished live in
`cad_ray.stages.*`, which never import Ray. A stage's `run(config, root, executor, ...)` asks the `Executor`
for calls on its worker class; this module only places those calls, bounds the work in flight, moves work off
dead workers and shows progress.
"""

from __future__ import annotations

import os
import sys
from collections import defaultdict, deque

from cad_ray.config import AttributionConfig
from cad_ray.errors import CadRayError
from cad_ray.hosts import KEPT_NAMESPACE, KeptHost, WorkerHost, kept_tag
from cad_ray.store import RunRoot

IN_FLIGHT_PER_WORKER = 2
CPU_WORKER_THREADS = 1  # float results depend on torch's thread count; all CPU workers use the same


def stop_kept_workers(address: str) -> int:
    """Kill every kept worker on the cluster at `address`; returns how many."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    stopped = 0
    for named in ray.util.list_named_actors(all_namespaces=True):
        if named["namespace"] == KEPT_NAMESPACE:
            try:
                ray.kill(ray.get_actor(named["name"], namespace=KEPT_NAMESPACE))
                stopped += 1
            except ValueError:  # it died since it was listed
                pass
    return stopped


def _unwrap(error: Exception) -> Exception:
    """The user-facing error inside a Ray task error (a wrapper's cause, a few levels down), if there is one."""
    seen = error
    for _ in range(8):
        if isinstance(seen, CadRayError):
            return seen
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            break
    return error


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

    def __init__(self, worker_class, config: AttributionConfig, root: str, address: str | None, keep: bool = False):
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
        threads = None if gpus else CPU_WORKER_THREADS
        self.keep, self.worker_class, self.config, self.root = keep, worker_class, config, root
        if keep:  # named, detached: the same actors serve the next command, which finds them by name
            import uuid

            self.remote, self.args = ray.remote(KeptHost), (threads,)
            self.tag, self.pool_id = kept_tag(self.request, threads), uuid.uuid4().hex
        else:
            self.remote = ray.remote(max_restarts=0, **self.request)(WorkerHost)
            self.args = (worker_class, config, root, threads)
        self.slot_of = {}  # actor -> its slot: a kept actor's name, which its replacement takes over
        self.actors = []  # placed and holding the model: the only ones that get work
        self.starting = {}  # readiness ref -> actor, until it has loaded the model
        self.ready_answer = None
        self.replacements_left, self.lost = 4 * self.size, 0
        for slot in range(self.size):
            self._start_actor(slot)

    def _start_actor(self, slot: int):
        if self.keep:
            actor = self.remote.options(name=f"{self.tag}-{slot}", namespace=KEPT_NAMESPACE,
                                        lifetime="detached", get_if_exists=True, max_restarts=0,
                                        **self.request).remote(*self.args)
        else:
            actor = self.remote.remote(*self.args)
        self.slot_of[actor] = slot
        self.starting[self._call(actor, self.READY)] = actor

    def _call(self, actor, method: str, *args):
        if self.keep:  # a kept actor runs any stage's worker: it is told which, for which command
            return actor.call.remote(self.pool_id, self.worker_class, self.config, self.root, method, *args)
        return actor.call.remote(method, *args)

    def _replace(self, actor) -> None:
        """A replacement for an actor that died, while the budget lasts (a worker that dies for a reason of its
        own would otherwise be restarted forever)."""
        self.lost += 1
        if self.replacements_left > 0:
            self.replacements_left -= 1
            self._start_actor(self.slot_of.pop(actor))

    def _admit(self, ref) -> None:
        """An actor's readiness call finished: it joins the pool, or is replaced if it died on the way (placed on
        a node that was dying: Ray takes some seconds to notice a node that is gone)."""
        actor = self.starting.pop(ref)
        try:
            self.ready_answer = self.ray.get(ref)
            self.actors.append(actor)
        except self.ray.exceptions.RayActorError:
            self._replace(actor)
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
        """Stop the actors, so that their CPUs or GPUs are free for the next stage; kept actors stay, with the
        model loaded, for the next command and only drop this pool's workers."""
        if self.keep:
            self.ray.wait([a.release.remote(self.pool_id) for a in self.actors], num_returns=len(self.actors),
                          timeout=60)
        else:
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
                return self.ray.get(self._call(actor, method, *args))
            except self.ray.exceptions.RayActorError:
                self.actors.remove(actor)
                self._replace(actor)
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
                if load[actor] and len(queue) <= len(self.starting):
                    # what is left waits for the actors still loading the model, one unit each: the first actor
                    # ready would otherwise take two of a few large units (stacked concepts) and leave the
                    # others idle; a unit whose actor never comes goes to the first that is free
                    break
                call = queue.popleft()
                running[self._call(actor, call[1], *call[2])] = (call, actor)
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
                    self._replace(actor)
                continue
            except Exception as e:
                raise _unwrap(e) from None
            yield call[0], result


def worker_pool(worker_class, config: AttributionConfig, root: str, address: str | None, local: bool,
                keep: bool = False):
    return _LocalPool(worker_class, config, root) if local else _RayPool(worker_class, config, root, address, keep)


class Executor:
    """Where a stage's calls run: pools of Ray actors (one pool per worker class, opened on first use) or this
    process (`local`). A stage asks for `first` (one call, e.g. the model's fingerprint), `map` (many units, with
    a progress bar) and `judge_frames` (image rows), then the driver closes the pools."""

    def __init__(self, config: AttributionConfig, root: str, address: str | None = None, local: bool = False,
                 progress: bool = True, keep_workers: bool = False):
        self.config, self.root, self.address, self.local, self.progress = config, root, address, local, progress
        self.keep_workers = keep_workers
        self.pools = {}
        if not progress:  # --quiet: Ray's own notices too (start-up, token mode), errors still show
            import logging

            for name in ("ray", "ray._private.authentication.authentication_token_setup"):  # ray.init resets "ray"
                logging.getLogger(name).setLevel(logging.ERROR)

    def pool(self, worker_class):
        if worker_class not in self.pools:
            self.pools[worker_class] = worker_pool(worker_class, self.config, self.root, self.address, self.local,
                                                   self.keep_workers)
        return self.pools[worker_class]

    def first(self, worker_class, method: str, *args):
        return self.pool(worker_class).first(method, *args)

    def map(self, worker_class, method: str, units: list, desc: str, total: int | None = None):
        """Yield (unit, result) as `worker.method(unit)` finishes for each unit, with a progress bar that counts
        `total` units (those already done included)."""
        from tqdm.auto import tqdm

        total = len(units) if total is None else total
        with tqdm(total=total, initial=total - len(units), unit="unit", desc=desc,
                  disable=not self.progress or not total) as bar:
            for unit, result in self.pool(worker_class).map([(u, method, (u,)) for u in units]):
                bar.update(1)
                yield unit, result

    def close_pool(self, worker_class) -> None:
        """Free a pool's CPUs or GPUs for what the stage does next."""
        if worker_class in self.pools:
            self.pools.pop(worker_class).close()

    def close(self) -> None:
        for worker_class in list(self.pools):
            self.close_pool(worker_class)

    @property
    def workers(self) -> int:
        return max((p.size for p in self.pools.values()), default=1)

    @property
    def workers_lost(self) -> int:
        return sum(p.lost for p in self.pools.values())

    def judge_frames(self, worker_class, frames: list, on_rows) -> int:
        """Every frame through `worker_class(config, root)(frame)` on the pool's actors (a GPU each where there are
        GPUs), or in this process; `on_rows(judged)` gets each judged frame as it finishes. The pool stays open,
        with its model loaded, for the stage's next frames. Returns the number of workers."""
        if not frames:
            return 0
        pool = self.pool(worker_class)
        for _, judged in pool.map([(i, "__call__", (frame,)) for i, frame in enumerate(frames)]):
            on_rows(judged)
        return pool.size


def run_stage(stage, config: AttributionConfig, root: str, address: str | None = None, local: bool = False,
              progress: bool = True, keep_workers: bool = False, **options) -> dict:
    """Run one stage (a `cad_ray.stages` module) on Ray actors, or in this process with `local`; with
    `keep_workers`, on actors kept on the cluster for the next command (KeptHost)."""
    from cad_ray.store.root import run_root_above

    if keep_workers and address is None and not local:
        import ray

        if not ray.is_initialized():  # a Ray started for this command ends with it, and its workers too
            raise CadRayError("--keep-workers keeps workers on a running Ray cluster for the next command: start "
                              "one (`ray start --head`) and name it with --address auto")
    run = RunRoot(root)
    above = None if run.is_s3 else run_root_above(os.path.dirname(run.path))
    if above is not None:  # a root inside another root's tables would break every reader of that root
        raise CadRayError(f"--root {root} lies inside the run root {above}; choose a place outside it")
    run.check_writable()
    executor = Executor(config, root, address, local, progress, keep_workers and not local)
    try:
        with run.locked(stage.__name__.rsplit(".", 1)[-1]):
            return stage.run(config, root, executor, **options)
    finally:
        executor.close()


def run_attribution(config: AttributionConfig, root: str, **options) -> dict:
    """Compute (or resume) every shard, reduce and write the score tables; returns the completed manifest."""
    from cad_ray.stages import attribution

    return run_stage(attribution, config, root, **options)


def run_validation(config: AttributionConfig, root: str, **options) -> dict:
    """Random-ablation validation of a completed attribution run (config.validation says what to draw)."""
    from cad_ray.stages import validation

    return run_stage(validation, config, root, **options)


def run_evaluation(config: AttributionConfig, root: str, **options) -> dict:
    """Edits judged by images (config.evaluation says which): evaluation/ and evaluation_summary/; then, where
    evaluation.probes names any, the probes of the judged edits: probes/, probe_summary/, probe_verdicts/."""
    from cad_ray.stages import evaluation, probing

    result = run_stage(evaluation, config, root, **options)
    if config.evaluation.probes:
        result["probes"] = run_stage(probing, config, root, **options)
    return result
