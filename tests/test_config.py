"""Configs: presets load, overrides apply, and bad input fails early with one clear line."""

from __future__ import annotations

import shlex
import subprocess
import sys
import time

import pytest
import yaml

from foundry.launch.cli import main
from foundry.pretrain.config import ConfigError, RunConfig, load_config, reference, to_yaml
from tests.conftest import data_args


@pytest.fixture
def tiny_args(stdlib_shards) -> list[str]:
    return ["configs/models/tiny.yaml", "configs/quickstart.yaml", *data_args(stdlib_shards)]


def test_overrides_win_and_types_are_kept(tiny_args):
    cfg = load_config(tiny_args[:2], [*tiny_args[2:], "train.lr=1e-3", "model.num_layers=2", "train.betas=[0.8,0.9]"])
    assert isinstance(cfg, RunConfig)
    assert cfg.train.lr == 1e-3 and cfg.model.num_layers == 2 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.hidden_size == 64  # from the preset
    assert cfg.data.datasets[0].weight == 1.0 and cfg.data.streams == 4


def test_every_key_is_documented():
    lines = reference()
    assert any("train.lr" in line for line in lines)
    assert all(not line.rstrip().endswith(":") for line in lines), [line for line in lines if line.rstrip().endswith(":")]


@pytest.mark.parametrize(
    "override, names",
    [
        ("train.lrr=0.1", ["train.lrr", "unknown"]),
        ("model.num_kv_heads=3", ["model.num_heads=4", "model.num_kv_heads=3", "1, 2, 4"]),
        ("train.lr=-0.1", ["train.lr=-0.1", "positive"]),
        ("data.datasets=[{path: /nonexistent/corpus}]", ["data.datasets[0].path=/nonexistent/corpus", "prepare-data"]),
        ("data.streams=3", ["train.global_batch_size=32", "data.streams=3"]),
        ("train.max_steps=many", ["train.max_steps", "many"]),
        ("data.seq_len=4096", ["data.seq_len=4096", "model.max_seq_len=1024"]),
        ("train.global_batch_size=10", ["train.global_batch_size=10", "micro_batch_size=16"]),
    ],
)
def test_bad_config_fails_with_one_line_naming_key_and_fix(override, names, capsys, tiny_args):
    assert main(["train", *tiny_args, override]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err, err
    assert err.startswith("foundry: config error:")
    for name in names:
        assert name in err, (name, err)


def test_layout_that_cannot_split_the_batch_is_rejected(tiny_args):
    from foundry.pretrain.config import check_world_size

    cfg = load_config(tiny_args[:2], [*tiny_args[2:], "train.global_batch_size=16", "train.micro_batch_size=4"])
    assert check_world_size(cfg.train, 2) == 2
    with pytest.raises(ConfigError, match="micro_batch_size x data-parallel ranks = 4 x 3"):
        check_world_size(cfg.train, 3)


def test_bad_config_fails_before_deepspeed_is_imported(tiny_args):
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from foundry.launch.cli import main; rc = main(sys.argv[1:]);"
         "assert 'deepspeed' not in sys.modules; sys.exit(rc)",
         "train", *tiny_args, "model.num_kv_heads=3"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2, proc.stderr
    assert "num_kv_heads" in proc.stderr
    assert time.perf_counter() - start < 60


def test_missing_config_file():
    with pytest.raises(ConfigError, match="configs/nope.yaml not found"):
        load_config(["configs/nope.yaml"], [])


# The mistakes of issue 19, one test each. The base loads without its data: paths are preflight's to check.
BASE = ["configs/models/tiny.yaml", "configs/quickstart.yaml"]


def _refused(overrides: list[str], files: list[str] = BASE) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(files, overrides)
    message = str(e.value)
    assert message and "\n" not in message, message
    return message


def _suggested(message: str) -> list[str]:
    """The command-line words after the message's last "e.g.", as the shell would pass them."""
    return shlex.split(message.rsplit("e.g. ", 1)[1])


ENUMERATED = [
    ("parallel.activation_checkpointing", "fulll", ["off", "full", "selective"]),
    ("train.precision", "fp16", ["auto", "bf16", "fp32"]),
    ("data.on_error", "ignore", ["stop", "skip"]),
    ("kernels.attention", "flash_attn", ["auto", "flash-attn", "sdpa"]),
    ("kernels.rmsnorm", "fused", ["auto", "apex", "torch"]),
    ("kernels.optimizer", "adamw", ["auto", "torch-fused", "torch", "deepspeed-fused"]),
    ("parallel.zero_stage", "4", ["0", "1", "2", "3"]),
]


@pytest.mark.parametrize("key, bad, allowed", ENUMERATED)
def test_an_enumerated_key_refuses_another_value_naming_the_allowed_ones(key, bad, allowed):
    assert _refused([f"{key}={bad}"]) == f"{key}={bad} is not one of {', '.join(allowed)}"


@pytest.mark.parametrize("key, value", [(key, value) for key, _, allowed in ENUMERATED for value in allowed])
def test_every_allowed_value_loads_as_the_plain_value_and_is_written_back_as_spelled(key, value, tmp_path):
    section, name = key.split(".")
    plain = int(value) if value.isdigit() else value
    cfg = load_config(BASE, [f"{key}={value!r}" if isinstance(plain, str) else f"{key}={value}"])
    loaded = getattr(getattr(cfg, section), name)
    assert loaded == plain and type(loaded) is type(plain)  # other modules compare with plain strings
    written = tmp_path / "config.yaml"
    written.write_text(to_yaml(cfg))
    assert yaml.safe_load(written.read_text())[section][name] == plain  # as spelled, e.g. flash-attn
    assert load_config([str(written)], []) == cfg


def test_a_bare_off_that_yaml_reads_as_false_is_refused_with_the_quoting_that_works():
    message = _refused(["parallel.activation_checkpointing=off"])
    assert message.startswith("parallel.activation_checkpointing=False is not one of off, full, selective"), message
    fixed = shlex.split(message.rsplit("quote it: ", 1)[1])
    assert load_config(BASE, fixed).parallel.activation_checkpointing == "off"


@pytest.mark.parametrize("override, key", [
    ("parallel.activation_checkpointing_interval=0", "parallel.activation_checkpointing_interval"),  # i % every
    ("tracking.log_interval=0", "tracking.log_interval"),  # step % interval
    ("data.streams=0", "data.streams"),
    ("data.seq_len=0", "data.seq_len"),
    ("train.micro_batch_size=0", "train.micro_batch_size"),
    ("parallel.tensor=0", "parallel.tensor"),
    ("parallel.pipeline=0", "parallel.pipeline"),
    ("model.num_heads=0", "model.num_heads"),
    ("model.num_kv_heads=0", "model.num_kv_heads"),
    ("model.rope_scaling={low_freq_factor: 0}", "model.rope_scaling.low_freq_factor"),
    ("model.rope_scaling={low_freq_factor: 2.0, high_freq_factor: 2.0}", "model.rope_scaling.high_freq_factor"),
])
def test_a_zero_that_would_divide_later_is_refused_at_load(override, key):
    message = _refused(["parallel.activation_checkpointing=selective", override])
    assert message.startswith(f"{key}="), message


def test_a_zero_with_a_documented_meaning_loads():
    zeros = ["eval.interval=0", "checkpoint.interval=0", "data.workers=0", "kernels.loss_chunk_tokens=0",
             "train.spike_factor=0", "train.grad_clip=0", "train.step_timeout_seconds=0", "train.warmup_steps=0",
             "launch.max_restarts=0", "launch.slurm.cpus_per_node=0", "checkpoint.timeout_seconds=0",
             "eval.timeout_seconds=0"]
    cfg = load_config(BASE, zeros)
    assert (cfg.eval.interval, cfg.checkpoint.interval, cfg.data.workers, cfg.train.spike_factor) == (0, 0, 0, 0)


@pytest.mark.parametrize("override, unknown, nearest", [
    ("trian.lr=1", "trian", "train"),
    ("train.lrr=1", "train.lrr", "train.lr"),
    ("model.rope_scaling.factr=2.0", "model.rope_scaling.factr", "model.rope_scaling.factor"),
    ("data.datasets=[{path: a, wieght: 2}]", "data.datasets[0].wieght", "data.datasets[0].weight"),
])
def test_an_unknown_key_names_the_nearest_known_one(override, unknown, nearest):
    assert _refused([override]) == f"unknown config key '{unknown}': did you mean '{nearest}'?"


@pytest.mark.parametrize("text, unknown, nearest", [
    ("trian:\n  lr: 1.0\n", "trian", "train"),
    ("train:\n  warmup_step: 3\n", "train.warmup_step", "train.warmup_steps"),
])
def test_an_unknown_key_in_a_yaml_file_names_the_nearest_known_one(text, unknown, nearest, tmp_path):
    (tmp_path / "run.yaml").write_text(text)
    message = _refused([], [*BASE, str(tmp_path / "run.yaml")])
    assert message == f"unknown config key '{unknown}': did you mean '{nearest}'?"


def test_an_unknown_key_with_no_near_one_lists_the_keys_of_its_section():
    message = _refused(["checkpoint.zzz=1"])
    assert message == ("unknown config key 'checkpoint.zzz': the keys of [checkpoint] are interval, resume, keep, "
                       "init_from, save_consolidated, continue_on_save_error, timeout_seconds")


@pytest.mark.parametrize("override, expected", [
    ("data.datasets=data/doc", "data.datasets=data/doc is not a list: write it as one, e.g. data.datasets='[{path: "),
    ("eval.datasets=data/doc/holdout", "eval.datasets=data/doc/holdout is not a list: write it as one, e.g. "),
    ("train.betas=0.9", "train.betas=0.9 is not a list: write it as one, e.g. train.betas='[0.9, 0.95]'"),
    ("launch.slurm.sbatch_lines=--qos=high", "launch.slurm.sbatch_lines=--qos=high is not a list: write it as one"),
    ("launch.slurm.env=NCCL_DEBUG", "launch.slurm.env=NCCL_DEBUG is not a mapping: write it as one, e.g. "),
    ("data.datasets=[data/doc]", "data.datasets[0] is not a mapping of path, weight, urls: write the list as e.g. "),
    ("eval.datasets=[[data/doc]]", "eval.datasets[0] takes one value, not a list: e.g. eval.datasets="),
    ("train.lr=[0.1]", "train.lr takes one value, not a list: e.g. train.lr=0.0003"),
    ("data.seq_len={a: 1}", "data.seq_len takes one value, not a mapping: e.g. data.seq_len=256"),
    ("train=5", "train is a section, not a value: set its keys (seed, max_steps, "),
])
def test_a_value_of_the_wrong_shape_names_the_key_and_an_example_that_loads(override, expected):
    message = _refused([override])
    assert message.startswith(expected), message
    assert load_config(BASE, _suggested(message))  # the example is one that works


def test_loading_looks_at_no_path_the_config_names(tmp_path):
    missing = str(tmp_path / "missing")
    cfg = load_config(BASE, [f"data.datasets=[{{path: {missing}}}]", f"eval.datasets=[{missing}]",
                             f"checkpoint.init_from={missing}"])
    assert (cfg.data.datasets[0].path, cfg.eval.datasets, cfg.checkpoint.init_from) == (missing, [missing], missing)


@pytest.mark.parametrize("override, message", [
    ("data.datasets=[{path: MISSING}]", "data.datasets[0].path=MISSING has no manifest.json: prepare it with "
                                        "`foundry prepare-data INPUT... --out MISSING`"),
    ("eval.datasets=[MISSING]", "eval.datasets[0]=MISSING has no manifest.json: prepare it with "),
    ("checkpoint.init_from=MISSING", "checkpoint.init_from=MISSING has no config.json: point it at a Hugging Face "
                                     "Llama directory"),
])
def test_preflight_refuses_a_path_that_is_not_there(override, message, tmp_path, stdlib_shards):
    from foundry.pretrain.preflight import preflight

    missing = str(tmp_path / "missing")
    cfg = load_config(BASE, [*data_args(stdlib_shards), override.replace("MISSING", missing)])
    with pytest.raises(ConfigError) as e:
        preflight(cfg, 2)
    assert str(e.value).startswith(message.replace("MISSING", missing)), str(e.value)


def test_train_launch_and_eval_refuse_a_missing_validation_set_in_one_line(tmp_path, capsys, stdlib_shards):
    missing = tmp_path / "missing"
    run = tmp_path / "run"
    bad = [*data_args(stdlib_shards), f"eval.datasets=[{missing}]", f"train.run_dir={run}"]
    tag = run / "checkpoints" / "step00000001"  # `foundry eval` reads RUN_DIR/config.yaml before the checkpoint
    tag.mkdir(parents=True)
    (run / "config.yaml").write_text(to_yaml(load_config(BASE, bad)))
    for argv in (["train", *BASE, *bad], ["launch", "local", *BASE, *bad, "--dry-run"], ["eval", str(tag)]):
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip().splitlines() == [
            f"foundry: config error: eval.datasets[0]={missing} has no manifest.json: prepare it with `foundry "
            f"prepare-data INPUT... --holdout 0.01 --out DIR` (then DIR/holdout) or point at a prepared set"], argv


def test_bf16_without_zero_is_refused_with_the_stage_that_sums_in_fp32():
    message = _refused(["train.precision=bf16", "parallel.zero_stage=0"])
    assert message.startswith("parallel.zero_stage=0 with bf16") and "parallel.zero_stage=1" in message
    assert load_config(BASE, ["train.precision=bf16", "parallel.zero_stage=1"])
    assert load_config(BASE, ["train.precision=fp32", "parallel.zero_stage=0"])
