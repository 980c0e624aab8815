"""The DeepSpeed side without launching: configs resolved from the recipe, disagreements named by key, each rank's
share of the data stream, methods that limit the ZeRO stages, and the CLI refusing a bad config before any rank
starts."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sparseft.cli import app
from sparseft.data import Example, micro_batches
from sparseft.errors import UserError
from sparseft.methods import build_method
from sparseft.recipe import load_recipe
from sparseft.train.distributed import (CONFIGS_DIR, Ranks, check_method_stage, rank_batches, resolve_ds_config,
                                        zero_stage)
from tests.helpers import write_recipe


def recipe(tmp_path, config=None, **train):
    sections = {"train": {"micro_batch_size": 2, "grad_accum_steps": 3, "max_grad_norm": 0.5, **train}}
    if config is not None:
        sections["distributed"] = {"config": config}
    return load_recipe(write_recipe(tmp_path, "unused-model", **sections))


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS_DIR.glob("*.json")))
def test_bundled_configs_resolve(tmp_path, name):
    cfg = resolve_ds_config(recipe(tmp_path, f"configs/{name}"), world_size=4)
    assert cfg["train_micro_batch_size_per_gpu"] == 2 and cfg["gradient_accumulation_steps"] == 3
    assert cfg["train_batch_size"] == 2 * 3 * 4 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": False} and cfg["zero_allow_untested_optimizer"] is True
    assert zero_stage(cfg) == int(name[4])  # zero1.json ... zero3_offload.json
    assert "optimizer" not in cfg and "scheduler" not in cfg


def test_no_section_is_zero1_and_bf16_follows_the_model(tmp_path):
    r = recipe(tmp_path)
    assert zero_stage(resolve_ds_config(r)) == 1
    r = r.model_copy(update={"model": r.model.model_copy(update={"dtype": "bfloat16"})})
    assert resolve_ds_config(r)["bf16"]["enabled"] is True


@pytest.mark.parametrize("config, message", [
    ({"train_micro_batch_size_per_gpu": 8}, "distributed.config.train_micro_batch_size_per_gpu=8: differs from "
                                            "train.micro_batch_size=2"),
    ({"gradient_accumulation_steps": 1}, "distributed.config.gradient_accumulation_steps=1: differs from "
                                         "train.grad_accum_steps=3"),
    ({"gradient_clipping": 1.0}, "distributed.config.gradient_clipping=1.0: differs from train.max_grad_norm=0.5"),
    ({"train_batch_size": 7}, "distributed.config.train_batch_size=7: differs from"),
    ({"bf16": {"enabled": True}}, "distributed.config.bf16.enabled=True: differs from train.precision=fp32"),
    ({"fp16": {"enabled": True}}, "distributed.config.fp16.enabled=true: not supported"),
    ({"optimizer": {"type": "Adam"}}, "distributed.config.optimizer: sparseft builds it from the recipe"),
    ({"scheduler": {"type": "WarmupLR"}}, "distributed.config.scheduler: sparseft builds it from the recipe"),
    ({"zero_optimization": {"stage": 4}}, "distributed.config.zero_optimization.stage=4: must be 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": 0}, "bf16": {"enabled": True}}, "distributed.config.zero_optimization.stage=0: "
                                                                      "not supported with train.precision=bf16-mixed"),
])
def test_a_config_that_disagrees_with_the_recipe_names_the_key(tmp_path, config, message):
    r = recipe(tmp_path, config)
    if "stage=0" in message:
        r = r.model_copy(update={"model": r.model.model_copy(update={"dtype": "bfloat16"})})
    with pytest.raises(UserError) as e:
        resolve_ds_config(r, world_size=2)
    assert message in str(e.value)


def test_equal_or_auto_values_are_accepted(tmp_path):
    cfg = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 3, "gradient_clipping": "auto",
           "train_batch_size": 12, "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 2}}
    out = resolve_ds_config(recipe(tmp_path, cfg), world_size=2)
    assert out["train_micro_batch_size_per_gpu"] == 2 and out["gradient_clipping"] == 0.5
    assert out["bf16"]["enabled"] is False


def test_a_json_file_anywhere_and_a_missing_one(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 2.0}))
    with pytest.raises(UserError, match=r"distributed.config=.*mine.json: gradient_clipping=2.0: differs"):
        resolve_ds_config(recipe(tmp_path, str(path)))
    with pytest.raises(UserError, match="no such file .*configs/zero2.json"):
        resolve_ds_config(recipe(tmp_path, "configs/zero9.json"))


def test_ranks_share_the_single_process_stream():
    """Rank r takes every N-th example of each global micro-batch: together they are one process's batches at B*N,
    also from a resumed position."""
    examples = [Example(input_ids=[i, i + 1], labels=[-100, i + 1]) for i in range(10)]

    def rows(batch):
        return [tuple(r) for r in batch["input_ids"].tolist()]

    for start in (0, 6):
        single = itertools.islice(micro_batches(examples, 4, seed=3, start_k=start), 5)
        shards = [itertools.islice(rank_batches(examples, 2, 3, start, 0, Ranks(r, 2, True)), 5) for r in range(2)]
        for whole, r0, r1 in zip(single, *shards):
            assert rows(whole)[0::2] == rows(r0) and rows(whole)[1::2] == rows(r1)
    one = itertools.islice(rank_batches(examples, 3, 3, 0, 0, Ranks()), 4)
    for a, b in zip(one, itertools.islice(micro_batches(examples, 3, seed=3), 4)):
        assert torch.equal(a["input_ids"], b["input_ids"])


def test_methods_limit_their_zero_stages(tmp_path):
    r = load_recipe(write_recipe(tmp_path, "unused-model", {"name": "lora"}))
    for stage in (0, 1, 2, 3):
        check_method_stage(build_method(r.method), stage)  # no zero_stages: every stage

    class OnlyZero0:
        name, zero_stages = "m0", (0,)

    class SingleProcess:
        name, zero_stages = "m1", ()

    check_method_stage(OnlyZero0(), 0)
    with pytest.raises(UserError, match="zero_optimization.stage=2: method m0 supports ZeRO stage.s. 0"):
        check_method_stage(OnlyZero0(), 2)
    with pytest.raises(UserError, match="method.name=m1: runs in a single process only"):
        check_method_stage(SingleProcess(), 0)


def test_cli_refuses_a_bad_config_before_launching(tmp_path):
    path = write_recipe(tmp_path, "unused-model", train={"output_dir": str(tmp_path / "run")})
    result = CliRunner().invoke(app, ["train", str(path), "--nproc", "2", "distributed.config.gradient_clipping=3"])
    assert result.exit_code == 2, result.output
    assert "distributed.config.gradient_clipping=3: differs from train.max_grad_norm=1.0" in result.output
    assert not Path(tmp_path / "run").exists()
    result = CliRunner().invoke(app, ["train", str(path), "--nproc", "0"])
    assert result.exit_code == 2 and "--nproc 0: must be at least 1" in result.output


@pytest.mark.parametrize("text,message", [
    ("node1 slots=8\nnode2 slots=x\n", ":2: 'node2 slots=x': expected `HOST slots=N`"),
    ("node1 slots=0\n", ":1: 'node1 slots=0': expected `HOST slots=N` with N at least 1"),
    ("node1\n", ":1: 'node1': expected"),
    ("# only a comment\n\n", "lists no host"),
    ("node1 slots=4\nnode1 slots=4 # again\n", ":2: host node1 is listed twice"),
])
def test_a_bad_hostfile_is_named_with_its_line(tmp_path, text, message):
    path = write_recipe(tmp_path, "unused-model", train={"output_dir": str(tmp_path / "run")})
    hostfile = tmp_path / "hostfile"
    hostfile.write_text(text)
    result = CliRunner().invoke(app, ["train", str(path), "--hostfile", str(hostfile)])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert not Path(tmp_path / "run").exists()


def test_hostfile_launch_command(tmp_path, monkeypatch):
    """With a good hostfile the checks pass and DeepSpeed's runner gets the hostfile, the rendezvous port and the
    ranks a host; an unreachable host and --nproc above a host's slots are refused first."""
    from sparseft.train import launch as launch_module

    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node1 slots=4  # first\nnode2 slots=4\n")
    path = write_recipe(tmp_path, "unused-model", train={"output_dir": str(tmp_path / "run")})
    result = CliRunner().invoke(app, ["train", str(path), "--hostfile", str(hostfile), "--nproc", "8"])
    assert result.exit_code == 2 and "--nproc 8: more than the 4 slots" in " ".join(result.output.split())

    checked, started = [], []
    monkeypatch.setattr(launch_module, "check_hosts_reachable", lambda p, hosts: checked.append(hosts))

    class Proc:
        def __init__(self, cmd, env, **kwargs):
            started.append(cmd)

        def wait(self):
            return 0

    monkeypatch.setattr(launch_module.subprocess, "Popen", Proc)
    code = launch_module.launch_train(path, ["train.max_steps=3"], 2, hostfile, 29600, False, False)
    assert code == 0 and checked == [[("node1", 4), ("node2", 4)]]
    (cmd,) = started
    assert cmd[1:4] == ["-u", "-m", "deepspeed.launcher.runner"]
    assert f"--hostfile={hostfile}" in cmd and "--master_port=29600" in cmd and "--num_gpus=2" in cmd
    assert cmd[cmd.index("--module"):] == ["--module", "--no_local_rank", "--log_level=warning", "sparseft.cli",
                                           "train", str(path), "train.max_steps=3"]


def test_an_unreachable_host_is_refused(tmp_path):
    import shutil

    if shutil.which("ssh") is None:
        pytest.skip("no ssh here")
    from sparseft.train.launch import check_hosts_reachable

    with pytest.raises(UserError, match="no-such-host.invalid not reachable over passwordless ssh"):
        check_hosts_reachable(tmp_path / "hostfile", [("no-such-host.invalid", 1)])
