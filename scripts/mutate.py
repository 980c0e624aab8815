"""`make mutate`: mutation testing of sparseft's core mechanics with mutmut (not part of `make test`).

    python scripts/mutate.py                 # every module below, one after another, then the summary
    python scripts/mutate.py kernels hift    # some of them (names from MODULES)
    python scripts/mutate.py --summary       # the summary of what has run (mutants/summary.md)
    python scripts/mutate.py --mutmut ARGS   # mutmut itself, with the patch below (e.g. `show NAME`, `results`)

The modules and their mutants are configured in pyproject.toml ([tool.mutmut]); mutmut first runs the listed tests
once to learn which tests call each function, then runs each mutant against only the tests that cover its function.
Work happens in ./mutants (a mutated copy of the package; git ignores it), and results are kept there between runs.

Two patches to mutmut. It leaves out every decorated function, because a decorator may act when the function is
defined. `@torch.no_grad()` does not, and it sits on core code (the slice write, the LaMDA merge, the mask
re-application), so functions whose only decorators are torch.no_grad() are mutated too. And a mutant's tests
run fastest first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# name -> mutmut name patterns of its mutants (module path with dots, then the function)
MODULES = {
    "kernels": ["sparseft.kernels.*"],
    "s2ft.select": ["sparseft.methods.s2ft.select.*"],
    "s2ft.permute": ["sparseft.methods.s2ft.permute.*"],
    "lamda.layers": ["sparseft.methods.lamda.layers.*"],
    "hift": ["sparseft.methods.hift.*"],
    "squarehead.masks": ["sparseft.methods.squarehead.masks.*"],
    "squarehead.prune": ["sparseft.methods.squarehead.prune.*"],
    "train.checkpoint": ["sparseft.train.checkpoint.*"],
    "eval.exact_match": ["sparseft.eval.exact_match.*"],
}


def _patch_mutmut() -> None:
    import libcst as cst
    from mutmut.mutation import file_mutation

    visitor = next(c for c in vars(file_mutation).values()
                   if isinstance(c, type) and hasattr(c, "_skip_node_and_children"))
    original = visitor._skip_node_and_children

    def no_grad(d: cst.Decorator) -> bool:
        e = d.decorator
        return (isinstance(e, cst.Call) and isinstance(e.func, cst.Attribute) and e.func.attr.value == "no_grad"
                and isinstance(e.func.value, cst.Name) and e.func.value.value == "torch")

    def skip(self, node):
        if isinstance(node, cst.FunctionDef) and node.decorators and all(map(no_grad, node.decorators)):
            return original(self, node.with_changes(decorators=[]))
        return original(self, node)

    visitor._skip_node_and_children = skip

    # A mutant's tests run fastest first (mutmut hands them over in set order), so most mutants die in the first
    # seconds instead of after a training test.
    from mutmut.state import state
    from mutmut.workers import isolation

    for cls in [c for c in vars(isolation).values() if isinstance(c, type) and "submit" in vars(c)]:
        def submit(self, mutant_name, tests, *args, _submit=cls.submit, **kwargs):
            durations = state().duration_by_test
            return _submit(self, mutant_name, sorted(tests, key=lambda t: durations.get(t, 0.0)), *args, **kwargs)

        cls.submit = submit

    # mutmut's fork server imports the test modules once (its warm-up) and forks a process per mutant. What those
    # import only when a test runs (transformers' model classes, DeepSpeed's accelerator, sparseft's trainer and CLI)
    # every mutant's process imported again: some 2 s of each one's time, half a pass. The server imports them too.
    from mutmut.runners import harness

    def warm_up(self, _warm_up=harness.PytestRunner.warm_up):
        _warm_up(self)
        import importlib
        import pkgutil

        for name in PRELOAD:
            importlib.import_module(name)
        import torch

        if not torch.cuda.is_available():  # asked through NVML (below), which leaves CUDA uninitialised
            from deepspeed.accelerator import get_accelerator

            get_accelerator()  # on a GPU it would initialise CUDA, which forked processes then cannot use
        package = sys.modules["sparseft"]  # the mutated copy, as the test modules imported it
        for info in pkgutil.walk_packages(package.__path__, "sparseft."):
            if not info.name.endswith(".__main__"):  # that one runs the CLI
                importlib.import_module(info.name)

    harness.PytestRunner.warm_up = warm_up


# Imported by the fork server before it forks (see _patch_mutmut): what tests import lazily, at a cost.
PRELOAD = ["transformers.models.llama.modeling_llama", "transformers.models.mistral.modeling_mistral",
           "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen3.modeling_qwen3", "peft",
           "safetensors.torch", "datasets", "tokenizers.trainers"]


def _mutmut(args: list[str]) -> None:
    # mutmut runs two mutants' tests at once on two cores: one torch thread each (tests/conftest.py), where two
    # threads each made every test about 2.4 times slower.
    os.environ.setdefault("SPARSEFT_TEST_THREADS", "1")
    # The fork server collects the tests, and tests/conftest.py asks torch.cuda.is_available(): asked through NVML
    # it does not initialise CUDA in the server, so the tests marked cuda can use the GPU in each fork.
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    _patch_mutmut()
    from mutmut.__main__ import cli

    sys.argv = ["mutmut", *args]
    cli()


def summary() -> str:
    """Counts per module and the surviving mutants, from mutmut's result files."""
    from mutmut.stats import status_by_exit_code

    rows, survivors = [], []
    for name, patterns in MODULES.items():
        prefix = patterns[0].rstrip("*").rstrip(".")
        counts: dict[str, int] = {}
        for meta in sorted((ROOT / "mutants").glob("sparseft/**/*.py.meta")):
            data = json.loads(meta.read_text())
            for mutant, code in data.get("exit_code_by_key", {}).items():
                if not mutant.startswith(prefix + "."):
                    continue
                status = status_by_exit_code[code]
                counts[status] = counts.get(status, 0) + 1
                if status in ("survived", "no tests", "timeout", "suspicious"):
                    survivors.append(f"{mutant}: {status}")
        total = sum(counts.values())
        rows.append(f"| {name} | {total} | {counts.get('killed', 0)} | {counts.get('survived', 0)} | "
                    f"{counts.get('no tests', 0)} | {counts.get('timeout', 0)} | {counts.get('not checked', 0)} |")
    head = ["| module | mutants | killed | survived | no tests | timeout | not checked |",
            "|---|---|---|---|---|---|---|"]
    return "\n".join(head + rows) + "\n\nNot killed:\n" + "\n".join(f"- {s}" for s in survivors) + "\n"


def main(argv: list[str]) -> int:
    if argv[:1] == ["--mutmut"]:
        _mutmut(argv[1:])
        return 0
    if argv[:1] != ["--summary"]:
        unknown = [n for n in argv if n not in MODULES]
        if unknown:
            print(f"unknown module(s) {unknown}; known: {', '.join(MODULES)}", file=sys.stderr)
            return 2
        # One mutmut run for all (its clean run of the covering tests happens once); a module named again reruns.
        runs = [(name, MODULES[name]) for name in argv] or [("all modules", [])]
        for name, patterns in runs:
            began = time.perf_counter()
            code = subprocess.call([sys.executable, __file__, "--mutmut", "run", *patterns], cwd=ROOT)
            print(f"mutate {name}: mutmut exit {code}, {time.perf_counter() - began:.0f}s", flush=True)
    text = summary()
    (ROOT / "mutants").mkdir(exist_ok=True)
    (ROOT / "mutants" / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
