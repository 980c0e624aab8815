"""The training loop. It reads top to bottom: set-up, the step loop, the end of the run. It knows no method by name:
everything method-specific goes through the method protocol (sparseft/methods/base.py)."""

from __future__ import annotations

import contextlib
import itertools
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sparseft.data import build_datasets, micro_batches
from sparseft.errors import Interrupted, RunFailure, UserError
from sparseft.eval.perplexity import perplexity
from sparseft.eval.in_training import EVAL_FILE, eval_step
from sparseft.methods import MethodContext, build_method
from sparseft.models import load_model, load_tokenizer
from sparseft.recipe import Recipe, recipe_to_yaml
from sparseft.train.checkpoint import (TRAINABLE, RunDir, load_engine_state, load_method_state, load_trainable,
                                       prune_checkpoints, read_meta, save_state, set_rng_state)
from sparseft.train.distributed import (DeepSpeedEngine, Ranks, SilentReporter, full_parameters, rank_batches,
                                       start_ranks)
from sparseft.train.guard import NonFiniteGuard
from sparseft.train.resume import batch_meta, resume_batch, same_recipe
from sparseft.train.signals import StopSignals, signal_name
from sparseft.train.optim import Engine, lr_factor
from sparseft.train.precision import describe, keep_masters, peak_memory_mb, resolve_device, resolve_precision
from sparseft.train.report import Reporter, plot_loss
from sparseft.train.trackers import check_trackers, open_trackers


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    first_loss: float | None
    last_loss: float | None
    val_loss: float | None
    seconds: float


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train(recipe: Recipe, resume: bool = False, overwrite: bool = False, reporter_console=None) -> RunResult:
    """Run a recipe in this process, or as one rank of a launched job (every rank calls this; rank 0 writes).
    SIGTERM / SIGINT stop it after the current step and a checkpoint (`Interrupted`); a non-finite step stops it
    before anything of that step is saved (`RunFailure`, see sparseft/train/guard.py)."""
    with StopSignals() as stop, contextlib.ExitStack() as on_exit:
        return _train(recipe, resume, overwrite, reporter_console, stop, on_exit)


def _train(recipe: Recipe, resume: bool, overwrite: bool, reporter_console, stop: StopSignals,
           on_exit: contextlib.ExitStack) -> RunResult:
    t = recipe.train
    run = RunDir(Path(t.output_dir))
    precision = resolve_precision(t.precision, recipe.model.dtype)
    ranks = start_ranks()
    device = resolve_device("auto" if ranks.launched else t.device)
    check_trackers(t.report_to)
    seed_everything(t.seed)

    tokenizer = load_tokenizer(recipe.model.tokenizer or recipe.model.path, recipe.model.trust_remote_code,
                               key="model.tokenizer" if recipe.model.tokenizer else "model.path")
    data = build_datasets(recipe.data, tokenizer, seed=t.seed)
    model = load_model(recipe.model.path, recipe.model.dtype, recipe.model.trust_remote_code,
                       attn_implementation=recipe.model.attn_implementation, device=device)
    pad_id = tokenizer.pad_token_id
    # Only once the model and every data row have loaded (so bad input never costs an old run with --overwrite),
    # rank 0 checks and prepares the run directory; the others wait for its answer (or are stopped with it).
    ckpt = ranks.broadcast(prepare_run_dir(run, recipe, resume, overwrite) if ranks.is_main else None)
    if ckpt is not None:  # the checkpoint's global batch, also on another number of ranks
        recipe = resume_batch(recipe, read_meta(ckpt), ranks.world)
        t = recipe.train

    def calibration(n: int):  # global batches: a selection does not depend on how many ranks share them
        return itertools.islice(micro_batches(data.train, t.micro_batch_size * ranks.world, t.seed, 0, pad_id), n)

    n_base = sum(p.numel() for p in model.parameters())
    method = build_method(recipe.method)
    # Under DeepSpeed its bf16 path keeps the fp32 masters (and casts the module), so methods keep none of their own.
    ctx = MethodContext(recipe=recipe, tokenizer=tokenizer, calibration_batches=calibration, run_dir=run.path,
                        device=device, master_dtype=None if ranks.launched else precision.master_dtype,
                        full_parameters=full_parameters, lr_factor=lambda k: lr_factor(k, t))
    meta = read_meta(ckpt) if ckpt else {"step": 0, "examples_seen": 0}
    reporter = Reporter(run.metrics, t.max_steps, meta["step"], reporter_console,
                        open_trackers(recipe, run.path, meta["step"])) if ranks.is_main else SilentReporter()
    on_exit.callback(reporter.close)  # also when the run stops early: the progress display ends, metrics are closed
    ctx.log = reporter.info
    reporter.info(data.summary())
    reporter.info(describe(device, recipe.model.dtype, precision, ranks.launched))
    if ckpt is None:
        # Every rank selects (the same computation and RNG use as one process); rank 0's choice is the one kept.
        selection = ranks.broadcast(method.select(model, ctx))
        if ranks.is_main:
            run.write_json(run.selection, selection)
    else:
        selection = json.loads(run.selection.read_text())
    model = method.prepare(model, selection, ctx)
    if t.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad, so frozen embeddings (and HiFT's inactive
        # lower groups) still cut the backward pass where nothing below trains.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    trainable = method.trainable_parameters(model)
    n_train = sum(p.numel() for p in trainable.values())  # before the engine: ZeRO-3 leaves each rank a partition
    if ctx.master_dtype is not None:  # before the checkpoint loads, so resumed masters keep every bit
        keep_masters(method.master_parameters(model), precision)
    if ckpt is not None:
        load_trainable(model, ckpt / TRAINABLE)  # before the engine: DeepSpeed starts its partitions from them
    groups = method.optimizer_param_groups(model, t.weight_decay)
    engine = DeepSpeedEngine(model, groups, recipe, ranks, method) if ranks.launched \
        else Engine(model, groups, t, precision)
    guard = NonFiniteGuard(engine, t.on_nonfinite, t.max_skipped_steps, run.latest_checkpoint)
    reporter.info(f"method {method.name}: {n_train:,} trainable parameters; the base model has {n_base:,} "
                  f"({100 * n_train / n_base:.3f}%)" + (f"; {ranks.world} ranks, ZeRO stage {engine.stage}"
                                                         if ranks.launched else ""))

    start = 0
    if ckpt is not None:
        start = _restore(ckpt, engine, method)
        reporter.info(f"resumed from {ckpt} at step {start}")
    per_step = t.micro_batch_size * t.grad_accum_steps * ranks.world
    seen = meta["examples_seen"]
    stream = rank_batches(data.train, t.micro_batch_size, t.seed, seen, pad_id, ranks)

    first = last = val = None
    began = time.perf_counter()
    for step in range(start, t.max_steps):
        tick = time.perf_counter()
        method.on_step_start(step, model, engine.optimizer)
        extra = {}
        for _ in range(t.grad_accum_steps):
            batch = engine.to_device(next(stream))
            loss, logs = engine.loss(method.compute_loss, batch)
            engine.backward(loss / t.grad_accum_steps, batch)
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + float(v) / t.grad_accum_steps
        stats = engine.step()  # loss and tokens over every rank's share of the step, lr, gradient norm
        extra = engine.mean(extra)
        extra.update(method.on_step_end(step, model, engine.optimizer))
        done, seen = step + 1, seen + per_step
        first = stats["loss"] if first is None else first
        last = stats["loss"]
        record = {"step": done, "loss": stats["loss"], **extra, "lr": stats["lr"], "grad_norm": stats["grad_norm"],
                  "tokens_per_s": stats["tokens"] / max(time.perf_counter() - tick, 1e-9),
                  "peak_mem_mb": peak_memory_mb(device), "elapsed_s": time.perf_counter() - began,
                  **guard.check(done, stats)}
        reporter.log(record, show=done % t.log_every == 0 or done == t.max_steps)
        guard.raise_failure()
        with precision.autocast(device):  # a mixed model (fp32 masters over stored weights) computes as it trains
            if t.eval_every and data.validation and (done % t.eval_every == 0 or done == t.max_steps):
                val = _validate(engine.model, data.validation, t, pad_id)
                reporter.log({"step": done, "val_loss": val, "val_perplexity": float(np.exp(val))})
            eval_step(recipe, model, tokenizer, done, reporter)  # the recipe's eval tasks, when due
        due = bool(t.save_every and done % t.save_every == 0)
        signum = stop.agreed(ranks) if done < t.max_steps else 0
        if (due or signum) and done < t.max_steps:
            _save(run.checkpoints / f"step-{done:08d}", engine, trainable, method, _meta(done, seen, recipe, ranks),
                  True)
            if ranks.is_main:
                prune_checkpoints(run, t.keep_checkpoints)
        if signum:
            _stopped(run, done, signum, ranks)

    _save(run.final, engine, trainable, method, _meta(t.max_steps, seen, recipe, ranks), False)
    reporter.close()
    if data.validation is not None and val is None:
        with precision.autocast(device):
            val = _validate(engine.model, data.validation, t, pad_id)
    result = RunResult(run.path, t.max_steps - start, first, last, val, time.perf_counter() - began)
    if ranks.is_main:
        plot_loss(run.metrics, run.path / "loss.png", f"{method.name} · {Path(recipe.model.path).name}")
        run.write_json(run.path / "summary.json", {k: str(v) if isinstance(v, Path) else v
                                                   for k, v in result.__dict__.items()})
    return result


def prepare_run_dir(run: RunDir, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    """Create or reuse the run directory; returns the checkpoint to resume from (None for a fresh run)."""
    try:
        return _prepare_run_dir(run, recipe, resume, overwrite)
    except OSError as e:  # a file where the directory should be, a read-only place, a full disk
        raise UserError(f"train.output_dir={run.path}: cannot be used as a run directory ({e.strerror or e}: "
                        f"{e.filename or run.path})") from None


def _prepare_run_dir(run: RunDir, recipe: Recipe, resume: bool, overwrite: bool) -> Path | None:
    text = recipe_to_yaml(recipe)
    for p in [run.path, *run.path.parents]:  # Path.exists() says False under a file; say what is wrong
        if p.exists() and not p.is_dir():
            raise UserError(f"train.output_dir={run.path}: {p} is a file, not a directory")
    run.remove_stale_temps()
    if resume:
        if not run.recipe.exists():
            raise UserError(f"train.output_dir={run.path}: nothing to resume (no run there)")
        ckpt = run.latest_checkpoint()
        if ckpt is None:
            raise UserError(f"train.output_dir={run.path}: no checkpoint to resume from (set train.save_every)")
        if not same_recipe(run.recipe.read_text(), text):
            raise UserError(f"train.output_dir={run.path}: the recipe differs from the one the run started with; "
                            "resume with the same recipe and overrides")
        return ckpt
    if run.has_run():
        if not overwrite:
            raise UserError(f"train.output_dir={run.path}: holds a run already; use --resume to continue it, "
                            "--overwrite to replace it, or another train.output_dir")
        for p in (run.checkpoints, run.final):
            shutil.rmtree(p, ignore_errors=True)
        for p in (run.metrics, run.selection, run.path / "summary.json", run.path / "loss.png", run.path / EVAL_FILE):
            p.unlink(missing_ok=True)
    run.path.mkdir(parents=True, exist_ok=True)
    run.recipe.write_text(text)
    return None


def _meta(step: int, examples_seen: int, recipe: Recipe, ranks: Ranks) -> dict:
    return {"step": step, "examples_seen": examples_seen, **batch_meta(recipe, ranks.world)}


def _save(out: Path, engine, trainable: dict, method, meta: dict, checkpoint: bool) -> None:
    """Every rank takes part in gathering (ZeRO holds partitions); rank 0 writes."""
    tensors = engine.gather(trainable)
    engine_state = engine.state_dict() if checkpoint else None
    if engine.is_main:
        try:
            save_state(out, tensors, meta, method.state_dict(), engine_state)
        except OSError as e:  # a full disk: the temporary directory is gone, older checkpoints are untouched
            kept = RunDir(out.parent.parent if checkpoint else out.parent).latest_checkpoint()
            raise RunFailure(f"step {meta['step']}: cannot write {out} ({e.strerror or e}); newest checkpoint kept: "
                             f"{kept or 'none'}") from None


def _stopped(run: RunDir, step: int, signum: int, ranks: Ranks) -> None:
    """Every rank leaves together once rank 0 has written the checkpoint (the launcher stops the job when the first
    rank exits)."""
    ranks.all_sum([0.0])
    ckpt = run.checkpoints / f"step-{step:08d}"
    raise Interrupted(f"{signal_name(signum)}: stopped after step {step}; checkpoint {ckpt}; continue with --resume",
                      signum)


def _restore(ckpt: Path, engine, method) -> int:
    """Optimizer, schedule, method and RNG state of a checkpoint (its weights are already in the model). Nothing is
    unpickled: tensors are safetensors, the rest JSON."""
    engine_state, rng = load_engine_state(ckpt)
    # The method first: it may put master weights back (HiFT's active group), and the optimizer casts its state to
    # each parameter's dtype as it loads.
    method.load_state_dict(load_method_state(ckpt))
    engine.load_state_dict(engine_state)
    set_rng_state(rng)
    return read_meta(ckpt)["step"]


def _validate(model, examples, t, pad_id) -> float:
    was_training = model.training
    model.eval()
    result = perplexity(model, examples, t.micro_batch_size, pad_id, max_batches=t.eval_batches)
    model.train(was_training)
    return result["loss"]
