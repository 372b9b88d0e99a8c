"""`ftray tune`: a Ray Tune sweep of a recipe over a tune space, one Ray Train run per trial.

Tune runs `run_trial`, a driver function (the Ray ≥ 2.43 pattern; passing a Trainer to the Tuner is
deprecated), once per trial: it applies the trial's sampled run-spec paths to the base spec, builds
the foundation's TorchTrainer under a run name that is stable across restarts (the trial id), fits
it, and Train's TuneReportCallback forwards every evaluation to Tune, where ASHA stops weak trials.

    ftray tune quickstart --space tune_spaces/lora.yaml --num-samples 4 --soup greedy

Everything is validated before Ray starts: the recipe, the space's paths, one sampled spec.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from ftray.config import RunSpec, SpecError, build_spec, load_spec
from ftray.methods import build_methods
from ftray.train.loop import make_plan
from ftray.train.trainer import build_trainer, ensure_ray, prepare_rows, storage_path
from ftray.tune.space import TuneSpace, load_space, method_name, overrides_of, param_space, sample_spec


DRIVER_MEMORY = 512 * 1024**2  # bytes: a trial's driver process (Python, torch, Ray Train) resident


@dataclass
class SweepPlan:
    """A validated sweep: the base spec (with the sweep's cadence), the space and where it goes."""

    spec: RunSpec
    space: TuneSpace
    params: dict[str, Any]  # resolved run-spec path → Ray Tune domain
    name: str
    space_file: str

    @property
    def experiment_dir(self) -> str:
        """Tune's experiment dir: `<output.dir>/<name>` (a local path or a URI)."""
        return f"{storage_path(self.spec)}/{self.name}"


def plan_sweep(recipe: str | None, space_file: str, overrides: list[str] = (), num_samples: int | None = None) -> SweepPlan:
    """Validate the recipe, the space (paths the spec lacks fail with the path) and one sampled spec."""
    spec = load_spec(recipe, list(overrides))
    space = load_space(space_file)
    if num_samples:
        space = space.model_copy(update={"num_samples": num_samples})
    method = method_name(space_file)
    params = param_space(space, spec, method)
    check_shared_rows(params, spec)
    spec = with_sweep_cadence(spec, space)
    sample_spec(params, spec)  # types and ranges of the sampled values, against the full spec
    name = spec.output.name or f"tune-{Path(recipe).stem if recipe else 'run'}-{method}"
    return SweepPlan(spec, space, params, name, str(space_file))


def check_shared_rows(params: dict[str, Any], spec: RunSpec) -> None:
    """Trials share rows tokenized once by the driver, so the space may not vary what produced them."""
    methods = build_methods(spec.methods)
    for path in params:
        parts = path.split(".")
        if parts[0] in ("data", "model"):
            raise SpecError(f"tune space: {path!r}: trials share the rows tokenized once for the sweep, so "
                            "data.* and model.* cannot vary within one sweep; run one sweep per value")
        if parts[0] == "methods" and "prepare_data" in type(methods[int(parts[1])]).hooks():
            raise SpecError(f"tune space: {path!r}: method {methods[int(parts[1])].name!r} rewrites the training data, "
                            "which the sweep does once for all trials; fix its fields in the recipe instead")


def with_sweep_cadence(spec: RunSpec, space: TuneSpace) -> RunSpec:
    """Evaluate every ASHA grace period (unless the recipe says) and checkpoint at evaluations.

    ASHA's rungs sit at grace_period·reduction_factorᵏ steps, so evaluating every grace_period steps
    gives each rung a result; a checkpoint at every evaluation carries the metric that ranks it.
    """
    every = spec.train.eval_every or space.scheduler.grace_period
    ckpt = spec.train.checkpoint_every or every
    if ckpt % every:
        raise SpecError(f"train.checkpoint_every={ckpt} must be a multiple of train.eval_every={every} in a sweep, "
                        f"so that every checkpoint carries {space.metric!r} and the best one is kept")
    return build_spec(spec.model_dump(mode="json"), [f"train.eval_every={every}", f"train.checkpoint_every={ckpt}"])


class EvalReportCallback(TuneReportCallback):
    """Train's Tune report callback, forwarding only results that carry the sweep's metric.

    Tune refuses results without the metric it optimises, and the loop also reports plain training
    lines (every `log_every` steps); those stay in the run's metrics.jsonl.
    """

    def __init__(self, metric: str) -> None:
        super().__init__()
        self.metric = metric

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        """Forward rank 0's result to Tune if it has the metric."""
        if self.metric in metrics[0]:
            super().after_report(run_context, metrics, checkpoint)


def run_trial(config: dict[str, Any], base: dict[str, Any], rows: dict[str, ray.ObjectRef], runs_dir: str,
              metric: str, mode: str) -> None:
    """Tune's driver function: the trial's run spec → a TorchTrainer named for the trial → fit."""
    trial_id = tune.get_context().get_trial_id()
    raw = copy.deepcopy(base)
    # A stable (storage, name) per trial: a restored sweep re-runs the trial and Train resumes its run.
    raw["output"] = {**raw["output"], "dir": runs_dir, "name": trial_id}
    spec = build_spec(raw, overrides_of(config))
    callback = EvalReportCallback(metric)  # built here: it attaches to this trial's Tune session
    # When ASHA stops a trial, Tune ends this process and with it the Train controller; Train's
    # placement-group cleaner then frees the workers' CPUs, finding its cluster through the State API.
    # On a host running several Ray clusters that lookup fails unless RAY_ADDRESS names this one, and
    # only a runtime_env reaches the controller's processes: so the fit runs in a task that carries it.
    env = {"env_vars": {"RAY_ADDRESS": ray.get_runtime_context().gcs_address}}
    fit = ray.remote(num_cpus=0)(fit_train_run).options(runtime_env=env)
    ray.get(fit.remote(spec.model_dump(mode="json"), trial_id, rows, callback, (metric, mode)))


def fit_train_run(spec: dict[str, Any], name: str, rows: dict[str, ray.ObjectRef], callback: EvalReportCallback,
                  keep_best: tuple[str, str]) -> None:
    """Build the foundation's TorchTrainer for one trial and fit it (a Ray task of `run_trial`)."""
    spec = RunSpec.model_validate(spec)
    build_trainer(spec, name, rows["train"], rows["eval"], callbacks=[callback], keep_best=keep_best).fit()


def trial_dirname(trial: Any) -> str:
    """Tune's per-trial dir: the trial id (the default embeds every sampled value in the name)."""
    return f"trial_{trial.trial_id}"


def max_concurrent(spec: RunSpec) -> int:
    """Trials whose Train workers fit the cluster at once (by GPUs, else CPUs); Train waits for all its workers."""
    resources, s = ray.cluster_resources(), spec.scaling
    if s.use_gpu:
        return max(1, int(resources.get("GPU", 0) // s.num_workers))
    return max(1, int(resources.get("CPU", 1) // (s.num_workers * s.cpus_per_worker)))


def scheduler(space: TuneSpace, max_steps: int) -> ASHAScheduler | FIFOScheduler:
    """ASHA on the training step (the loop reports `step`), or run every trial to its end."""
    if space.scheduler.type == "fifo":
        return FIFOScheduler()
    # stop_last_trials=False: max_t only places the rungs; a trial with more steps than the base spec runs on.
    return ASHAScheduler(time_attr="step", max_t=max_steps, grace_period=space.scheduler.grace_period,
                         reduction_factor=space.scheduler.reduction_factor, stop_last_trials=False)


def build_tuner(plan: SweepPlan, rows: dict[str, ray.ObjectRef], max_steps: int, resume: bool) -> tune.Tuner:
    """A new Tuner for the plan, or the interrupted one restored from its experiment dir."""
    space = plan.space
    driver = tune.with_parameters(run_trial, base=plan.spec.model_dump(mode="json"), rows=rows,
                                  runs_dir=f"{plan.experiment_dir}/runs", metric=space.metric, mode=space.mode)
    # The driver only waits on its Train run, whose workers hold the CPUs/GPUs: with 0 CPUs the Train
    # runs, not idle drivers, fill the cluster (at 1 CPU each, 2 CPUs could not run one 1-worker trial
    # beside another). Tune needs a non-empty request, so the driver reserves the memory it uses.
    trainable = tune.with_resources(driver, {"CPU": 0, "memory": DRIVER_MEMORY})
    if resume:
        return tune.Tuner.restore(plan.experiment_dir, trainable=trainable, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=plan.params,
        tune_config=tune.TuneConfig(
            metric=space.metric, mode=space.mode, num_samples=space.num_samples, scheduler=scheduler(space, max_steps),
            max_concurrent_trials=max_concurrent(plan.spec), trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name=plan.name, storage_path=storage_path(plan.spec),
                                  failure_config=tune.FailureConfig(max_failures=max(0, plan.spec.scaling.max_failures))),
    )


def check_resume(plan: SweepPlan, resume: bool) -> None:
    """`--resume` needs an earlier sweep of this name; a new sweep must not overwrite one."""
    exists = tune.Tuner.can_restore(plan.experiment_dir)
    if resume and not exists:
        raise SpecError(f"--resume: no sweep to resume at {plan.experiment_dir}")
    if not resume and (exists or ("://" not in plan.experiment_dir and Path(plan.experiment_dir).exists())):
        raise SpecError(f"{plan.experiment_dir} already holds a sweep: pass --resume to continue it, "
                        "or --set output.name=<new name>")


def run_sweep(plan: SweepPlan, resume: bool = False) -> tuple[tune.ResultGrid, int, int]:
    """Tokenize once, share the rows through the object store, run the Tuner.

    Returns the result grid, the base spec's number of training steps and its number of training rows.
    """
    check_resume(plan, resume)
    methods = build_methods(plan.spec.methods)
    train, eval_rows, _ = prepare_rows(plan.spec, methods)  # bad rows fail here, before Ray starts
    if plan.space.metric == "eval_loss" and not eval_rows:
        raise SpecError("data: the evaluation split is empty, but the sweep optimises eval_loss")
    max_steps = make_plan(plan.spec, len(train), plan.spec.scaling.num_workers, methods).max_steps
    if plan.space.scheduler.type == "asha" and plan.space.scheduler.grace_period >= max_steps:
        grace = plan.space.scheduler.grace_period
        print(f"[ftray] ASHA grace_period {grace} ≥ {max_steps} steps: no trial will be stopped early")
    ensure_ray()
    rows = {"train": ray.put(train), "eval": ray.put(eval_rows)}  # one copy in the object store for all trials
    grid = build_tuner(plan, rows, max_steps, resume).fit()
    return grid, max_steps, len(train)
