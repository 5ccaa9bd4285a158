"""Submitting a run: plan (pure) -> launch spec (pure) -> run directory + registry row -> backend.

`prepare` resolves the profile and config into a plan; `dry_run` shows what would be submitted and
writes nothing; `create` writes the run directory and the registry row and submits the first job,
leaving nothing behind if any step fails; `submit_attempt` starts one more job of an existing run
(a resume or a retry). Every scheduler call goes through the run's backend (clusterctl.backends).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from clusterctl.planning.plan import Plan, plan_for_run
from clusterctl.planning.profiles import ClusterProfile, check_job_name, load_profile, profile_origin
from clusterctl.planning.recipes import find_recipe, known_recipes, paper_facts
from clusterctl.planning.whole_run import paper_warnings
from clusterctl.runs import dependencies, evaljob, preflight
from clusterctl.runs.preflight import Checks
from clusterctl.specs import RunRecord, RunState
from vltrain.common.errors import UserError
from vltrain.config import TrainConfig, load_train_config
from vltrain.data.shard_spec import url_scheme

if TYPE_CHECKING:
    from clusterctl.runs.registry import Registry

# `plan` runs `prepare` alone: what only writing and submitting need (the registry, the backends,
# atomic writes, the run directory) is imported by the functions that do it.

RUNS_DIR_ENV = "CLUSTERCTL_RUNS_DIR"


def runs_root() -> Path:
    """Where new run directories go: $CLUSTERCTL_RUNS_DIR or ./runs (must be on a shared filesystem).
    Not UTF-8 (bytes Python holds as surrogates): one line before anything is made, as the job script,
    JSON and Slurm carry the path as text."""
    raw = os.environ.get(RUNS_DIR_ENV, "runs")
    if not raw.isprintable() and any("\udc80" <= c <= "\udcff" for c in raw):
        shown = os.fsencode(raw).decode("utf-8", "backslashreplace")
        raise UserError(f"{RUNS_DIR_ENV}: '{shown}' is not UTF-8; allowed: a directory path that is UTF-8 text")
    return Path(raw).absolute()


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A run ready to submit: its profile, the resolved config, the plan (JSON-able), its name, the
    train config it came from, and what the checks before sbatch found."""

    profile: ClusterProfile
    config: TrainConfig
    plan: dict[str, Any]
    name: str
    source: str
    checks: Checks
    profile_source: str = ""  # where the profile file came from (shipped, your config, the working directory...)
    snapshot: bool = False  # submit --snapshot: copy the source into the run directory (runs.snapshot)


def config_source(profile: ClusterProfile, config: Path | None, model_given: bool = False) -> Path | None:
    """--config, else the recipe the profile names; with neither, the built-in defaults when --model
    says what to train, else a one-line error naming the recipes."""
    if config is not None:
        return config
    if profile.recipe:
        return find_recipe(profile.recipe, f"profile {profile.name}: recipe")
    if model_given:
        return None
    raise UserError(
        f"--config: profile {profile.name!r} names no recipe; allowed: --config FILE or one of the recipes "
        f"({', '.join(known_recipes())}), e.g. --config configs/seed-002.toml"
    )


def prepare(
    profile_name: str,
    config: Path | None,
    layers: list[tuple[str, dict[str, Any]]],
    name: str | None = None,
    check: bool = True,
    allow_env: bool = False,
    estimate: bool = True,
) -> Prepared:
    """Profile + train config (+ overrides, each layer named by its flag) -> the resolved config, the
    plan with the estimate of the whole run (`estimate`; `plan` shows none, and skips it), and the
    checks before sbatch."""
    profile = load_profile(profile_name, flag="--profile", allow_env=allow_env)
    source = config_source(profile, config, any(flag == "--model" for flag, _ in layers))
    cfg = absolute_data_paths(load_train_config(source, None, *layers))
    plan, resolved = plan_for_run(profile, cfg)
    plan_d = plan.to_dict() | {"steps": resolved.steps}
    plan_d["not_reproduced"] = paper_facts(source).items() if source else []  # the recipe's [paper] (issue 25)
    if estimate:  # the whole run, and a warning when it is far from the paper's (planning.whole_run)
        plan_d["estimate"] = run_estimate(profile, plan, resolved.steps, source)
        plan_d["warnings"] = plan_d["warnings"] + paper_warnings(plan_d["estimate"])
    run_name = check_job_name(name or (cfg.model if isinstance(cfg.model, str) else cfg.model.name))
    checks = preflight.check(resolved, plan_d, profile) if check else preflight.Checks()
    if check:  # the plan's own warnings (planning.advice) are submit's too, once per subject
        said = {w.split(":")[0] for w in checks.warnings} | ({"memory"} if preflight.memory(plan_d)[1] else set())
        checks.warnings.extend(w for w in plan_d.get("warnings", []) if w.split(":")[0] not in said)
        checks.problems.extend(evaljob.problems(profile, resolved.to_dict()))  # eval_after = 'job' needs a scheduler
    return Prepared(
        profile, resolved, plan_d, run_name, str(source or "<defaults>"), checks, profile_origin(profile_name)
    )


def refuse(p: Prepared) -> None:
    """Submit nothing the job cannot get past: the first problem as one line (exit 2)."""
    if p.checks.problems:
        raise UserError(
            p.checks.problems[0]
            + (f" (and {len(p.checks.problems) - 1} more: --dry-run lists them)" if len(p.checks.problems) > 1 else "")
        )


def run_estimate(profile: ClusterProfile, plan: Plan, steps: int, recipe: Path | None = None) -> dict[str, Any]:
    """Time, GPU-hours, kWh and CO2 the plan implies for the whole run, stored beside what gets measured,
    and the paper's run (`recipe`'s [paper]): planning.whole_run, as `plan` and `estimate --profile` say."""
    from clusterctl.planning.whole_run import whole_run

    return whole_run(profile, plan, steps, recipe=recipe)


def absolute_data_paths(cfg: TrainConfig) -> TrainConfig:
    """Relative data paths are the submitter's (its working directory); jobs start elsewhere."""
    d = cfg.data
    fixed: dict[str, Any] = {
        k: str(Path(v).absolute())
        for k in ("shards", "eval_shards", "tokenizer", "classes")
        if (v := getattr(d, k)) and not v.startswith("/") and not url_scheme(v)  # URLs: refused as such
    }
    return dataclasses.replace(cfg, data=dataclasses.replace(d, **fixed)) if fixed else cfg


def dry_run(p: Prepared, run_dir: Path, hold: bool = False) -> dict[str, Any]:
    """What `create` would submit: the plan, the resolved config (the shape of a config file), what
    the checks found, the backend's rendering of the job and its environment."""
    from clusterctl.backends import get_backend

    backend = get_backend(p.profile.executor)
    spec = backend.launch_spec(p.profile, run_dir, p.name, hold=hold)
    text = backend.dryrun(spec)
    return {
        "plan": p.plan,
        "config": p.config.to_dict(),
        "source": p.source,
        "profile_source": p.profile_source,
        "checks": p.checks.to_dict(),
        "not_reproduced": p.plan["not_reproduced"],  # what the recipe does not reproduce of its paper
        "checks_skipped": p.checks.skipped,  # e.g. the partition, when no scheduler answers here
        "executor": spec.executor,
        "run_dir": str(run_dir),
        "sbatch": text if backend.renders_script else None,
        "env": spec.env,
        "notify": notify_line(),  # the user's [notify], webhooks masked (their URLs are secrets); None without
        "text": text,
    }


def notify_line() -> str | None:
    """What submit would copy of the user's [notify] (runs.notify.save_settings), in one masked line."""
    from clusterctl.planning.user_config import read_notify

    conf = read_notify()
    return conf.describe() if conf is not None else None


def new_run_dir(reg: Registry, name: str) -> tuple[str, Path]:
    run_id = reg.new_run_id(name)
    return run_id, runs_root() / run_id


def create(
    reg: Registry,
    p: Prepared,
    run_id: str,
    run_dir: Path,
    max_retries: int,
    hold: bool = False,
    after: list[dict[str, Any]] | None = None,
    defer: bool = False,
) -> str:
    """Write the run directory and registry row, then submit the first job; returns its id.
    Nothing is left behind when any step fails: no directory, no registry row. `after`: the runs it
    waits for (runs.dependencies.resolve_after: submit --after), kept in its plan. `defer`: submit
    nothing, return "" (a sweep's points go as one job array: runs.sweep)."""
    import getpass
    import shutil
    import time

    from vltrain.common.atomic import write_json, write_toml
    from vltrain.rundir import RunDir

    refuse(p)
    rd = RunDir(run_dir)
    run_dir.mkdir(parents=True, mode=0o700)
    prof, cfg = p.profile, p.config
    run = RunRecord(
        run_id=run_id,
        name=p.name,
        profile=prof.name,
        executor=prof.executor,
        run_dir=str(run_dir),
        created_at=time.time(),
        user=getpass.getuser(),
        gpus=prof.world_size,
        total_steps=cfg.steps,
        state=RunState.SUBMITTING,
        config=cfg.to_dict(),
        plan=p.plan | {"max_retries": max_retries} | ({"after": after} if after else {}),
    )
    try:
        write_toml(rd.config, cfg.to_dict())
        write_json(rd.plan, run.plan)
        write_json(rd.profile, prof.to_dict())
        write_json(rd.ds_config, ds_config(cfg, prof))
        from clusterctl.runs import notify, provenance, snapshot  # what is submitted, before the first attempt

        provenance.write(run_dir, snapshot.take(run_dir) if p.snapshot else None)
        notify.save_settings(run_dir)  # the user's [notify], what every observer of the run uses (0600)
        reg.add_run(run)
        if defer:
            return ""
        return submit_attempt(reg, run, prof, "submit", hold=hold, dependency=dependencies.dependency(after or []))
    except BaseException:
        shutil.rmtree(run_dir, ignore_errors=True)
        reg.delete_run(run_id)
        raise


def ds_config(cfg: TrainConfig, profile: ClusterProfile) -> dict[str, Any]:
    """The DeepSpeed config the trainer builds for this run (vltrain.engines.deepspeed): on the profile's
    device (`gpu.kind`: cuda or cpu), with buckets sized for the model's parameters. What it decides
    on CUDA (overlap_comm, fused AdamW, the buckets) is what runs on GPUs. A gradient reduction set
    in the job's environment (VLTRAIN_GRAD_REDUCTION, for comparisons) is the trainer's to apply."""
    from vltrain.dsconfig import deepspeed_config
    from vltrain.model_math import param_count
    from vltrain.presets import resolve_model

    return deepspeed_config(
        cfg,
        cfg.micro_batch,
        cfg.accumulation,
        profile.world_size,
        device=profile.gpu.kind,
        params=param_count(resolve_model(cfg.model)),
    )


def run_profile(run: RunRecord) -> ClusterProfile:
    """The profile a run was submitted with (a copy lives in its run directory)."""
    import json

    from clusterctl.planning.profiles import parse_profile
    from vltrain.rundir import RunDir

    path = RunDir(run.run_dir).profile
    data = json.loads(path.read_text())
    data.pop("derived", None)
    return parse_profile(data, str(path))


def submit_attempt(
    reg: Registry,
    run: RunRecord,
    profile: ClusterProfile,
    kind: str,
    hold: bool = False,
    exclude: tuple[str, ...] = (),
    dependency: str | None = None,
    event: dict[str, Any] | None = None,
) -> str:
    """Submit one attempt of `run` (first submission, resume or retry); returns the job id. `exclude`:
    nodes it must not run on; `dependency`: the scheduler's condition on other jobs (Backend.launch_spec);
    `event`: more of the attempt's registry event (a retry's why and excluded nodes: lifecycle.retry_event)."""
    from clusterctl.backends import get_backend
    from clusterctl.runs.attempt import Attempt
    from vltrain.common.atomic import write_json
    from vltrain.rundir import RunDir

    backend = get_backend(profile.executor)
    spec = backend.launch_spec(profile, Path(run.run_dir), run.name, hold=hold, exclude=exclude, dependency=dependency)
    write_json(RunDir(run.run_dir).launch, dataclasses.asdict(spec))
    job_id = backend.submit(spec, Attempt(run.run_dir, run.run_id, str(Path(reg.path).absolute())))
    attempt_submitted(reg, run, profile, job_id, kind, event)
    return job_id


def attempt_submitted(
    reg: Registry, run: RunRecord, profile: ClusterProfile, job_id: str, kind: str, event: dict[str, Any] | None = None
) -> None:
    """What follows an accepted attempt (also each task of a sweep's array): its registry job, state
    and event, its follow-up, its evaluation job and dependents."""
    from clusterctl.backends import get_backend
    from clusterctl.runs import followup

    backend = get_backend(profile.executor)
    reg.add_job(run.run_id, job_id, kind)
    reg.set_run_state(run.run_id, backend.initial_state)
    reg.add_event(run.run_id, kind, (event or {}) | {"job_id": job_id})
    followup.arm(reg, run, profile, job_id)  # retries it if it fails, with no clusterctl process running
    dependencies.on_new_attempt(reg, run, profile, job_id)  # its evaluation job, the runs waiting for it
