"""DeepSpeed is pinned to one minor version (pyproject.toml) because checkpoints and resharding use its
internals. The installed version must be in the pinned range, and every internal we use must still be
there: a DeepSpeed upgrade that moves one fails here, by name, instead of in a user's resume."""

from __future__ import annotations

import importlib
import inspect
import tomllib
from importlib.metadata import version

from packaging.requirements import Requirement
from packaging.version import Version

from foundry.pretrain.checkpoint import HostCopies
from tests.conftest import REPO

# (module, attribute path): the private or unstable parts of DeepSpeed this project relies on.
INTERNALS = [
    # checkpoint.py: our checkpoint engine replaces the engine's; its recovery-script copy is turned off.
    ("deepspeed.runtime.engine", "DeepSpeedEngine._copy_recovery_script"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine._save_zero_checkpoint"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine._load_checkpoint"),
    ("deepspeed.runtime.engine", "DeepSpeedEngine._get_all_zero_checkpoint_state_dicts"),
    ("deepspeed.runtime.checkpoint_engine.checkpoint_engine", "CheckpointEngine.preserves_storage_sharing"),
    # checkpoint.safe_load admits these classes of DeepSpeed's in its files.
    ("deepspeed.utils.tensor_fragment", "fragment_address"),
    ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
    ("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
    ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
    # reshard.py: AdamW's state is created and linked to each parameter's fragment before it is set.
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer._lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer._lazy_init_hp_params_optimizer_state"),
    ("deepspeed.runtime.zero.partition_parameters", "ZeroParamStatus.AVAILABLE"),
    ("deepspeed.utils", "safe_set_full_fp32_param"),
    ("deepspeed.utils", "safe_set_full_optimizer_state"),
    ("deepspeed.utils", "safe_set_local_fp32_param"),
    ("deepspeed.utils", "safe_set_local_optimizer_state"),
]

# (module, class, attribute): attributes the optimizers and the engine set on themselves in __init__.
INSTANCE_ATTRIBUTES = [
    ("deepspeed.runtime.zero.stage_1_and_2", "DeepSpeedZeroOptimizer", ["_param_slice_mappings",
     "single_partition_of_fp32_groups", "optimizer", "_hp_optimizer_states_linked"]),
    ("deepspeed.runtime.bf16_optimizer", "BF16_Optimizer", ["_param_slice_mappings", "fp32_groups_flat_partition",
     "optimizer", "_hp_optimizer_states_linked"]),
    ("deepspeed.runtime.zero.stage3", "DeepSpeedZeroOptimizer_Stage3", ["fp16_groups", "fp32_partitioned_groups_flat",
     "optimizer"]),
    ("deepspeed.runtime.engine", "DeepSpeedEngine", ["global_steps", "skipped_steps", "global_samples"]),
]

# The keys of DeepSpeed's checkpoint files that reshard.py reads, as DeepSpeed names them.
FILE_KEYS = ["OPTIMIZER_STATE_DICT", "SINGLE_PARTITION_OF_FP32_GROUPS", "BASE_OPTIMIZER_STATE", "PARAM_SLICE_MAPPINGS",
             "FP32_FLAT_GROUPS"]


def _pin() -> Requirement:
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return next(Requirement(d) for d in dependencies if Requirement(d).name == "deepspeed")


def test_the_installed_deepspeed_is_the_pinned_minor_version():
    pin, installed = _pin(), Version(version("deepspeed"))
    assert installed in pin.specifier, f"deepspeed {installed} is outside pyproject's {pin}"
    lowest = min(Version(s.version) for s in pin.specifier if s.operator == ">=")
    next_minor = Version(f"{lowest.major}.{lowest.minor + 1}")
    assert next_minor not in pin.specifier and Version(f"{lowest.major}.{lowest.minor}.99") in pin.specifier, \
        f"{pin} does not pin one minor version"


def test_every_deepspeed_internal_we_use_is_there():
    missing = []
    for module, path in INTERNALS:
        obj = importlib.import_module(module)
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None:
            missing.append(f"{module}.{path}")
    assert not missing, f"DeepSpeed {version('deepspeed')} lacks {missing}"


def test_the_attributes_deepspeed_sets_on_itself_that_we_read_are_still_set():
    missing = []
    for module, cls, attributes in INSTANCE_ATTRIBUTES:
        source = inspect.getsource(getattr(importlib.import_module(module), cls))
        missing += [f"{cls}.{a}" for a in attributes if f"self.{a} =" not in source]
    assert not missing, f"DeepSpeed {version('deepspeed')} no longer sets {missing}"


def test_the_checkpoint_file_keys_we_read_are_deepspeeds():
    from deepspeed.checkpoint import constants

    ours = (REPO / "pretrain" / "reshard.py").read_text()
    for key in FILE_KEYS:
        value = getattr(constants, key)
        assert f'"{value}"' in ours, f"reshard.py does not read {key} as {value!r}"


def test_our_checkpoint_engine_implements_deepspeeds_whole_interface():
    from deepspeed.runtime.checkpoint_engine.checkpoint_engine import CheckpointEngine

    interface = {name for name, _ in inspect.getmembers(CheckpointEngine, inspect.isfunction) if not name.startswith("_")}
    ours = {name for name, _ in inspect.getmembers(HostCopies, inspect.isfunction)}
    assert interface <= ours, f"HostCopies lacks {sorted(interface - ours)} of DeepSpeed's CheckpointEngine"
    # The engine saves and loads through whatever `checkpoint_engine` holds, which is what we replace.
    from deepspeed.runtime.engine import DeepSpeedEngine

    for method in (DeepSpeedEngine.save_checkpoint, DeepSpeedEngine._save_zero_checkpoint,
                   DeepSpeedEngine._load_checkpoint, DeepSpeedEngine._get_all_zero_checkpoint_state_dicts):
        assert "self.checkpoint_engine" in inspect.getsource(method), f"{method.__qualname__} bypasses it"
