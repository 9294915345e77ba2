"""`train_and_evaluate(config, workdir)`: the whole training run of one cascade stage.

Parts, in order: validate config -> mesh -> stage modules -> input pipeline -> state (fresh or restored)
-> compile the step ahead of time -> loop (progress, metrics, non-finite check, checkpoints, sample grids).
The same code runs on 1 CPU, 8 fake CPU devices or a pod slice: only the mesh differs.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from imagen_jax.data.pipeline import make_loader, read_text_columns
from imagen_jax.data.sources import build_source
from imagen_jax.errors import CheckpointError, ConfigError, NonFiniteError
from imagen_jax.parallel import distributed, memory, xla_options
from imagen_jax.parallel import mesh as mesh_lib
from imagen_jax.stage import checkpoint, stacking
from imagen_jax.stage.build import Stage, build_stage
from imagen_jax.stage.images import save_grid, side_by_side, to_uint8
from imagen_jax.stage.sampling import generate
from imagen_jax.text.embedding_cache import EmbeddingCache
from imagen_jax.training import preemption
from imagen_jax.training import state as state_lib
from imagen_jax.training.config_checks import validate_config
from imagen_jax.training.progress import MetricWriter, Progress
from imagen_jax.training.state import TrainState, make_optimizer
from imagen_jax.training.step import TrainStep, make_train_step
from imagen_jax.training.text_pretraining import prepare_run_text

log = logging.getLogger("imagen_jax")


class NonFiniteLossError(NonFiniteError):
    pass


def global_batch(local: dict[str, np.ndarray], mesh: jax.sharding.Mesh, rules) -> dict[str, jax.Array]:
    """Host-local numpy batch -> global arrays sharded over the batch mesh axes (multi-host ready)."""
    out = {}
    for key, value in local.items():
        if value.dtype == object:  # captions stay on the host
            continue
        sharding = mesh_lib.batch_sharding(mesh, rules, value.ndim)
        out[key] = jax.make_array_from_process_local_data(sharding, value)
    return out


def frozen_inputs(config: ml_collections.ConfigDict, stage: Stage, params: Any) -> dict[str, Any]:
    """The step's inputs that never change: weights it reads but never trains (a frozen text encoder) and
    the positions at which it reads the train state's `params` (arrays or shapes) held stacked by shape."""
    frozen = {} if config.text.train_jointly else {"text": stage.text.params}
    if stacking.enabled(config):
        frozen["positions"] = stacking.positions(params, NamedSharding(stage.mesh, PartitionSpec()))
    return frozen


class _CachedText:
    """Loader tokenize_fn that returns precomputed T5 embeddings instead of token ids."""

    def __init__(self, cache: EmbeddingCache, length: int):
        self.cache = cache
        self.length = length

    def __call__(self, captions: list[str]) -> dict[str, np.ndarray]:
        # Padded to the tokenizer's max length: the same text shape as encoding on the fly, which the
        # U-Net's parameters (text positions) and the sampler see.
        emb, mask = self.cache.lookup(captions, length=self.length)
        return {"text_emb": emb, "text_mask": mask}


def text_inputs(config: ml_collections.ConfigDict, workdir: str, source: object, stage: Stage):
    """Token ids for the step to encode, or (config.text.embedding_cache) cached embeddings."""
    if not config.text.embedding_cache:
        return stage.text.tokenizer
    if config.text.train_jointly:
        raise ConfigError(
            "config.text.embedding_cache needs a frozen encoder: set config.text.train_jointly=False."
        )
    path = config.text.embedding_cache_dir or os.path.join(workdir, "text_cache")
    # Process 0 decides, so that every process takes part in building it (a collective) or none does.
    if not multihost_utils.broadcast_one_to_all(np.int32(epath.Path(path).is_dir())):
        log.info("building the T5 embedding cache for %d captions in %s", len(source), path)
        captions = read_text_columns(source, ("caption",))["caption"]
        EmbeddingCache.build(
            captions,
            stage.text,
            path,
            mesh=stage.mesh,
            rules=stage.rules,
            batch_size=config.train.batch_size,
            dtype=config.text.embedding_cache_dtype,
            encoder_name=config.text.encoder,
        )
    cache = EmbeddingCache.open(path)
    cache.check(embed_dim=stage.text.embed_dim, encoder=config.text.encoder)
    return _CachedText(cache, stage.text.max_length)


def _sample_grid(
    stage: Stage, state: TrainState, prompts: list[str], path: str, seed: int, lowres: np.ndarray | None
) -> None:
    """The EMA model's samples for `prompts`; a super-resolution stage upsamples `lowres` (uint8, one per
    prompt: training examples' inputs, at the crop size when it trains on crops) and the grid shows each
    input beside its sample."""
    ema_stage = dataclasses.replace(stage, params=stacking.unstacked(state.ema_params))
    images = generate(ema_stage, prompts, rng=jax.random.PRNGKey(seed), lowres=lowres)
    if lowres is not None:
        save_grid(side_by_side([lowres, images]), [p for p in prompts for _ in range(2)], path, columns=8)
        return
    save_grid(images, prompts, path, columns=min(len(prompts), 8), upscale=2)


def preview_inputs(
    config: ml_collections.ConfigDict, stage: Stage, host_batch: dict[str, np.ndarray]
) -> tuple[list[str], np.ndarray | None]:
    """What the periodic sample grids show: `config.train.sample_prompts` for a base stage; for a
    super-resolution stage, the first (up to 8) examples of the first batch: captions and low-res inputs."""
    if not stage.lowres_resolution:
        return list(config.train.sample_prompts), None
    count = min(8, len(host_batch["caption"]))
    return [str(c) for c in host_batch["caption"][:count]], to_uint8(host_batch["lowres"][:count])


def train_step_fn(
    config: ml_collections.ConfigDict, stage: Stage, optimizer: optax.GradientTransformation
) -> TrainStep:
    """The (unjitted) train step of `stage` with the settings of `config`: callable as one function, or
    as its two phases."""
    return make_train_step(
        stage.unet,
        stage.text.module,
        optimizer,
        schedule=stage.schedule,
        diffusion=config.diffusion,
        lr_fn=state_lib.learning_rate_schedule(config.optim, config.train.num_steps),
        ema_decay_fn=lambda step: state_lib.ema_decay(config.optim, step),
        joint_text=config.text.train_jointly,
        grad_accum_steps=config.train.grad_accum_steps,
    )


@dataclasses.dataclass(frozen=True)
class CompileSeconds:
    """Where a program's compile time goes: Python tracing plus lowering to StableHLO, then XLA. With two
    programs the second is lowered while XLA compiles the first: `lower` is until the last program is
    lowered, `xla` the compiling after that, and `total` the wall time."""

    lower: float
    xla: float

    @property
    def total(self) -> float:
        return self.lower + self.xla


@dataclasses.dataclass(frozen=True)
class CompiledTrainStep:
    """The compiled train step: one program (the whole step), or the gradient program and the update
    program run one after the other (`config.train.separate_update`). Called as the step itself."""

    programs: tuple[jax.stages.Compiled, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return ("step",) if len(self.programs) == 1 else ("gradients", "update")

    def __call__(self, state: TrainState, batch: dict[str, jax.Array], frozen: Any) -> tuple[TrainState, Any]:
        if len(self.programs) == 1:
            return self.programs[0](state, batch, frozen)
        gradients, update = self.programs
        loss, grads = gradients(state, batch, frozen)
        return update(state, loss, grads)

    def as_text(self) -> str:
        """The compiled HLO of every program."""
        return "\n".join(program.as_text() for program in self.programs)

    def memory_plans(self) -> dict[str, memory.MemoryPlan | None]:
        """XLA's plan of each program, by name (None where the backend gives no plan)."""
        return {name: memory.memory_plan(p) for name, p in zip(self.names, self.programs, strict=True)}

    def memory_plan(self) -> memory.MemoryPlan | None:
        """XLA's plan of the program that needs the most memory per device: the step's peak, since the
        programs run one at a time (the state and the gradients count in both). None where the backend
        gives no plan."""
        return peak_plan(self.memory_plans())


def peak_plan(plans: dict[str, memory.MemoryPlan | None]) -> memory.MemoryPlan | None:
    """The largest of a step's program plans, or None if any program has none."""
    values = list(plans.values())
    return None if None in values else max(values, key=lambda plan: plan.total)


def _shapes(tree: Any) -> tuple[Any, list[tuple[tuple[int, ...], Any]]]:
    return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]


def compile_train_step(
    config: ml_collections.ConfigDict,
    stage: Stage,
    optimizer: optax.GradientTransformation,
    shardings: Any,
    state: TrainState,
    batch: dict[str, jax.Array],
    frozen: Any,
    check_memory: bool = True,
) -> tuple[CompiledTrainStep, CompileSeconds]:
    """The train step jitted with explicit shardings and a donated state, compiled ahead of time for
    these exact inputs (a shape change fails loudly instead of recompiling); also the seconds spent
    tracing and lowering it and in XLA's compiler.

    With `config.train.separate_update` the gradients and the update (clipping, optimizer, EMA) are two
    programs compiled at the same time on two threads (the update first, while the gradients are traced):
    XLA compiles much of a program on one core, and the update of a large model is thousands of small
    kernels. The gradients pass between them as arrays sharded like the parameters; the second
    program takes the state donated.
    With `check_memory`, a program that cannot fit in device memory is refused here, naming the fixes."""
    step = train_step_fn(config, stage, optimizer)
    options = xla_options.compiler_options(config.get("xla_options"))
    batch_shardings = {k: v.sharding for k, v in batch.items()}
    replicated = NamedSharding(stage.mesh, PartitionSpec())  # loss and metrics: on every host
    pool = concurrent.futures.ThreadPoolExecutor(2)  # XLA releases the GIL
    t0 = time.perf_counter()
    try:
        with mesh_lib.activation_rules(stage.mesh, stage.rules):
            if config.train.get("separate_update", False):
                # The update first, from the shapes the gradients will have (those of the parameters): it
                # compiles on the second core while the gradients are traced and while XLA's passes over
                # them run on one core, rather than only beside their code generation, which uses both.
                grads_in = (
                    jax.ShapeDtypeStruct((), jnp.float32),
                    jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), state.params),
                )
                update = jax.jit(
                    step.update,
                    in_shardings=(shardings, replicated, shardings.params),
                    out_shardings=(shardings, replicated),
                    donate_argnums=(0,),  # the gradients are not: no output has their place to take
                    compiler_options=options,
                ).lower(state, *grads_in)
                update_compiled = pool.submit(update.compile)
                gradients = jax.jit(
                    step.gradients,
                    in_shardings=(shardings, batch_shardings, None),
                    out_shardings=(replicated, shardings.params),
                    compiler_options=options,
                ).lower(state, batch, frozen)
                if _shapes(gradients.out_info) != _shapes(grads_in):
                    raise AssertionError("the gradients are not shaped as the update was compiled for")
                pending = [pool.submit(gradients.compile), update_compiled]
            else:
                whole = jax.jit(
                    step,
                    in_shardings=(shardings, batch_shardings, None),
                    out_shardings=(shardings, replicated),
                    donate_argnums=(0,),
                    compiler_options=options,
                ).lower(state, batch, frozen)
                pending = [pool.submit(whole.compile)]
        t1 = time.perf_counter()
        programs = tuple(future.result() for future in pending)
    finally:
        pool.shutdown(wait=False)  # an error is raised now, not after the other program compiles
    seconds = CompileSeconds(lower=t1 - t0, xla=time.perf_counter() - t1)
    compiled = CompiledTrainStep(programs)
    if check_memory:
        for program, name in zip(programs, compiled.names, strict=True):
            memory.check_fits(
                program,
                what=f"the train step's {name} program at batch {config.train.batch_size}",
                fixes="Lower config.train.batch_size, set config.model.remat=True (recompute activations in "
                "the backward pass), or spread the batch over more devices (config.mesh).",
            )
    return compiled, seconds


def initial_state(
    config: ml_collections.ConfigDict,
    workdir: str,
    stage: Stage,
    optimizer: optax.GradientTransformation,
) -> tuple[TrainState, Any, bytes | None]:
    """(state, shardings, input position): restored from the newest checkpoint in `workdir` that verifies
    (damaged newer ones are named and moved to `checkpoints_damaged/`), or fresh when there is none."""
    if not checkpoint.has_checkpoints(workdir):
        state, shardings = state_lib.init_train_state(stage, optimizer, jax.random.PRNGKey(config.seed))
        return state, shardings, None
    structs, shardings = state_lib.abstract_train_state(stage, optimizer)
    restored, damaged = checkpoint.restore_newest_good(workdir, lambda _: state_lib.to_items(structs), config)
    checkpoint.set_aside(workdir, damaged)
    if restored.data_state is None:
        raise CheckpointError(
            f"checkpoint {checkpoint.checkpoint_dir(workdir)}/{restored.step} has no input-pipeline state; "
            "it cannot be resumed exactly. Start a new --workdir."
        )
    log.info("resumed from %s at step %d", checkpoint.checkpoint_dir(workdir), restored.step)
    return state_lib.from_items(restored.items), shardings, restored.data_state


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState | None:
    """Trains the stage described by `config`, resuming from the newest good checkpoint in `workdir`.

    SIGTERM/SIGINT (preemption, a scheduler's time limit, Ctrl-C) and `config.train.time_budget_minutes`
    end the run the same way: the current step finishes, a checkpoint of it is written and read back, and
    the function returns normally, so rerunning the same command continues exactly. A signal before the
    first step (data, restore, compilation) ends the run at once; then it returns None.
    """
    with preemption.StopRequest() as stop:
        try:
            return _train(config, workdir, stop)
        except preemption.StoppedBeforeTraining as stopped:
            log.info("%s before training started: stopped, nothing new to save", stopped)
            return None


def _train(config: ml_collections.ConfigDict, workdir: str, stop: preemption.StopRequest) -> TrainState:
    validate_config(config)
    # A workdir of another stage or architecture is refused before its data or text files are touched.
    checkpoint.check_resumable(workdir, config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    cache = xla_options.use_compilation_cache(config, workdir)
    if cache:
        log.info("compilation cache: %s", cache)
    tc = config.train
    mesh = mesh_lib.make_mesh(config.mesh, dcn=config.mesh_dcn)
    mesh_lib.check_batch_divisible(tc.batch_size, mesh, config.sharding)
    if tc.grad_accum_steps > 1:
        mesh_lib.check_batch_divisible(
            tc.batch_size // tc.grad_accum_steps,
            mesh,
            config.sharding,
            what="config.train.batch_size / config.train.grad_accum_steps (the micro-batch)",
        )
    log.info(
        "devices: %d x %s over %d process(es), mesh %s, sharding %s",
        jax.device_count(),
        jax.devices()[0].platform,
        jax.process_count(),
        dict(mesh.shape),
        config.sharding.preset,
    )

    source = build_source(config.data, workdir, "train")
    prepare_run_text(config.text, workdir, source, xla_options.compiler_options(config.get("xla_options")))
    stage = build_stage(config, mesh, workdir)
    optimizer = make_optimizer(config.optim, tc.num_steps)
    loader = make_loader(
        source,
        batch_size=tc.batch_size,
        seed=config.data.seed,
        tokenize_fn=text_inputs(config, workdir, source, stage),
        worker_count=config.data.worker_count,
        prefetch=config.data.prefetch * tc.batch_size,
        crop_size=config.data.crop_resolution,
    )
    # Before the first step a run waits for its state and the step's compile: say which, and how long.
    waited = time.perf_counter()
    state, shardings, data_state = initial_state(config, workdir, stage, optimizer)
    start_step = int(jax.device_get(state.step))
    how = "initialised" if data_state is None else "restored"
    log.info("train state %s in %.1f s", how, time.perf_counter() - waited)

    frozen = frozen_inputs(config, stage, state.params)
    it = iter(loader)
    if data_state is not None:
        it.set_state(distributed.this_process_iterator_state(data_state))
    host_batch = next(it)
    preview_prompts, preview_lowres = preview_inputs(config, stage, host_batch)
    batch = global_batch(host_batch, mesh, stage.rules)
    log.info("compiling the train step at batch %d (or loading it from the compilation cache)", tc.batch_size)
    compiled, seconds = compile_train_step(config, stage, optimizer, shardings, state, batch, frozen)
    log.info(
        "compiled the train step in %.1f s (lowering %.1f s, XLA %.1f s)",
        seconds.total,
        seconds.lower,
        seconds.xla,
    )

    saver = checkpoint.CheckpointWriter(workdir, keep=tc.keep_checkpoints)
    writer = MetricWriter(os.path.join(workdir, "tensorboard"))
    progress = Progress(total_steps=tc.num_steps, batch_size=tc.batch_size, first_step=start_step)
    budget = tc.time_budget_minutes * 60.0
    started = time.perf_counter()
    nonfinite = jax.device_put(np.int32(0), NamedSharding(mesh, PartitionSpec()))
    last_checked = start_step
    step = start_step
    stopped_by = None
    pending = []  # device metrics since the last log, fetched only at log time (no per-step host sync)
    # Several processes stop together: a local stop request is voted on and taken by all at once.
    vote = distributed.StopVote(mesh, tc.stop_check_every) if jax.process_count() > 1 else None
    stop.training()

    def check_finite(upto: int) -> None:
        nonlocal last_checked
        if int(jax.device_get(nonfinite)):
            good = saver.last_good_step()
            kept = f"the last good checkpoint is step {good}" if good is not None else "none written yet"
            raise NonFiniteLossError(
                f"non-finite loss between steps {last_checked} and {upto}; no checkpoint was written after "
                f"step {last_checked} ({kept}). Lower config.optim.learning_rate or enable "
                "config.optim.grad_clip, then rerun to resume from it."
            )
        last_checked = upto

    # Whatever ends the loop (done, a stop request, non-finite values, an error), saves already started
    # are written and read back before returning or raising: a save is never lost half-written.
    try:
        while step < tc.num_steps:
            state, metrics = compiled(state, batch, frozen)
            nonfinite = nonfinite + metrics["nonfinite"]
            pending.append(metrics)
            step += 1
            if step == start_step + 1:
                jax.block_until_ready(state.step)
                progress.start(step)
            local_stop = stop.requested
            if budget > 0 and time.perf_counter() - started > budget:
                local_stop = local_stop or f"the time budget of {tc.time_budget_minutes:g} min"
            if vote is None:
                stopped_by = local_stop
            elif vote.any_stops(step, local_stop is not None, (state, metrics)):
                stopped_by = local_stop or "a stop request on another process"
            done = step >= tc.num_steps or stopped_by is not None
            if step % tc.log_every == 0 or done:
                check_finite(step)
                fetched = jax.device_get(pending)
                pending = []
                means = {k: float(np.mean([m[k] for m in fetched])) for k in ("loss", "grad_norm")}
                means["learning_rate"] = float(fetched[-1]["learning_rate"])
                rates = progress.update(step)
                writer.scalars(
                    step,
                    {
                        **{f"train/{k}": v for k, v in means.items()},
                        **{f"perf/{k}": v for k, v in rates.items()},
                    },
                )
                log.info(progress.line(step, means, rates))
            if step % tc.checkpoint_every == 0 or done:
                with progress.paused():
                    check_finite(step)
                    # The iterator has yielded exactly `step` batches: the next one feeds step + 1.
                    data_state = distributed.encode_iterator_states(it.get_state())
                    saver.save(step, state_lib.to_items(state), config, data_state)
            # An early stop skips the sample grid: preemption notices leave seconds, not minutes (and every
            # process must decide alike: sampling is collective).
            if tc.sample_every and (step % tc.sample_every == 0 or done) and not stopped_by:
                with progress.paused():
                    _sample_grid(
                        stage,
                        state,
                        preview_prompts,
                        os.path.join(workdir, "samples", f"step_{step:07d}.png"),
                        config.seed,
                        preview_lowres,
                    )
            if stopped_by:
                break
            if step < tc.num_steps:
                batch = global_batch(next(it), mesh, stage.rules)
        saver.wait()
        writer.scalars(
            step,
            {
                "perf/train_seconds": progress.train_seconds,
                "perf/wall_seconds": time.perf_counter() - started,
            },
        )
    finally:
        saver.close()
        writer.close()
    if stopped_by:
        log.info(
            "stopped by %s at step %d: checkpoint %s/%d is written and verified; rerun the same command to "
            "resume",
            stopped_by,
            step,
            checkpoint.checkpoint_dir(workdir),
            step,
        )
    log.info(
        "finished at step %d (%.1f s wall, %.1f s in steps)",
        step,
        time.perf_counter() - started,
        progress.train_seconds,
    )
    return state
