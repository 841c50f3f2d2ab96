"""Property-based tests (hypothesis) of config loading and validation, against rules written down here
independently of pretrain/config.py:

- whatever loads is valid: every value has its annotated type, every enumerated key one of its values,
  every range and every relation between keys holds;
- whatever is known to be invalid (a value outside an enumerated key's set, a number outside its key's range,
  a typo of a real key) is refused with one line that names the key (and the allowed values or the key meant);
- `validate` refuses a config exactly when one of the rules below is broken, naming a key of a broken rule
  (each relation between keys is exercised on its own, so that one that is not checked is found);
- random and malformed overrides and YAML files load or fail with our one-line ConfigError, never a traceback.

Derandomized: CI sees the same examples every run (explore more locally by removing derandomize).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import string
import typing
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from foundry.pretrain.config import ConfigError, DatasetConfig, RunConfig, load_config, validate

BASE = ["configs/models/tiny.yaml", "configs/quickstart.yaml"]


def fast(examples: int) -> settings:
    return settings(max_examples=examples, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


# The rules. Keys inside the list of datasets are written data.datasets[].KEY.
ENUMERATED: dict[str, set[Any]] = {
    "parallel.activation_checkpointing": {"off", "full", "selective"},
    "parallel.zero_stage": {0, 1, 2, 3},
    "kernels.attention": {"auto", "flash-attn", "sdpa"},
    "kernels.rmsnorm": {"auto", "apex", "torch"},
    "kernels.optimizer": {"auto", "torch-fused", "torch", "deepspeed-fused"},
    "data.on_error": {"stop", "skip"},
    "train.precision": {"auto", "bf16", "fp32"},
}
POSITIVE = {
    "model.vocab_size", "model.hidden_size", "model.num_layers", "model.num_heads", "model.num_kv_heads",
    "model.ffn_hidden_size", "model.rope_theta", "model.norm_eps", "model.max_seq_len",
    "model.rope_scaling.factor", "model.rope_scaling.low_freq_factor", "model.rope_scaling.original_max_seq_len",
    "parallel.tensor", "parallel.pipeline", "parallel.activation_checkpointing_interval",
    "data.seq_len", "data.streams", "data.datasets[].weight", "eval.tokens",
    "train.max_steps", "train.global_batch_size", "train.micro_batch_size", "train.lr", "train.eps",
    "train.collective_timeout_seconds", "train.spike_window", "train.max_skipped_in_row",
    "checkpoint.keep", "tracking.log_interval",
    "launch.nodes", "launch.procs_per_node", "launch.rdzv_port", "launch.grace_seconds", "launch.slurm.time_minutes",
}
NOT_NEGATIVE = {
    "model.init_std", "kernels.loss_chunk_tokens", "data.workers", "eval.interval", "train.warmup_steps",
    "train.weight_decay", "train.grad_clip", "train.step_timeout_seconds", "train.spike_factor",
    "checkpoint.interval", "tracking.flush_seconds", "launch.max_restarts", "launch.slurm.cpus_per_node",
    "checkpoint.timeout_seconds", "eval.timeout_seconds",
}


def broken_rules(cfg: RunConfig) -> list[set[str]]:
    """Every rule `cfg` breaks, each as the keys it involves; [] for a valid config. Types aside (`type_errors`)."""
    return [keys for holds, keys in [*_ranges(cfg), *_relations(cfg)] if not holds]


def _ranges(cfg: RunConfig) -> list[tuple[bool, set[str]]]:
    found = []
    for key, value, _ in leaves(cfg):
        general = key.split("[")[0] + "[]" + key.split("]")[1] if "[" in key else key
        found += [(not isinstance(value, float) or math.isfinite(value), {key}),
                  (general not in ENUMERATED or value in ENUMERATED[general], {key}),
                  (general not in POSITIVE or value > 0, {key}),
                  (general not in NOT_NEGATIVE or value >= 0, {key})]
    return found


def _relations(cfg: RunConfig) -> list[tuple[bool, set[str]]]:
    m, p, d, e, t = cfg.model, cfg.parallel, cfg.data, cfg.eval, cfg.train
    found = [
        (bool(d.datasets), {"data.datasets"}),
        (d.seq_len <= m.max_seq_len, {"data.seq_len", "model.max_seq_len"}),
        (t.warmup_steps < t.max_steps, {"train.warmup_steps", "train.max_steps"}),
        (0 <= t.min_lr_ratio <= 1, {"train.min_lr_ratio"}),
        (len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), {"train.betas"}),
        (t.spike_factor == 0 or t.spike_factor > 1, {"train.spike_factor"}),
        (not (d.document_mask and p.pipeline > 1), {"data.document_mask", "parallel.pipeline"}),
        (not cfg.launch.max_restarts or cfg.checkpoint.resume, {"launch.max_restarts", "checkpoint.resume"}),
    ]
    if m.num_heads > 0 and m.num_kv_heads > 0:  # else a range is broken already, and these would divide by 0
        found += [(m.hidden_size % m.num_heads == 0, {"model.hidden_size", "model.num_heads"}),
                  (m.num_heads % m.num_kv_heads == 0, {"model.num_heads", "model.num_kv_heads"}),
                  (m.hidden_size // m.num_heads % 2 == 0, {"model.hidden_size", "model.num_heads"})]
    if t.micro_batch_size > 0 and d.streams > 0 and d.seq_len > 0:
        found += [(t.global_batch_size % t.micro_batch_size == 0,
                   {"train.global_batch_size", "train.micro_batch_size"}),
                  (t.global_batch_size % d.streams == 0, {"train.global_batch_size", "data.streams"}),
                  (e.tokens % d.seq_len == 0, {"eval.tokens", "data.seq_len"})]
    if m.rope_scaling is not None:
        found.append((m.rope_scaling.high_freq_factor > m.rope_scaling.low_freq_factor,
                      {"model.rope_scaling.high_freq_factor"}))
    return found


def type_errors(cfg: RunConfig) -> list[str]:
    """The keys whose value does not have the type the schema annotates."""
    return [key for key, value, kind in leaves(cfg) if not _has_type(value, kind)]


def _has_type(value: Any, kind: Any) -> bool:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union:
        return any(_has_type(value, a) for a in args)
    if origin is typing.Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(_has_type(k, args[0]) and _has_type(v, args[1])
                                               for k, v in value.items())
    if kind is type(None):
        return value is None
    return type(value) is kind  # exactly: a bool is no int here, an int no float


def leaves(section: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(key, value, annotated type) of every value that is not a section, sections' entries included."""
    found = []
    for name, kind in typing.get_type_hints(type(section)).items():
        value, key = getattr(section, name), f"{prefix}{name}"
        if dataclasses.is_dataclass(value):
            found += leaves(value, key + ".")
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]):
            for i, entry in enumerate(value):
                found += leaves(entry, f"{key}[{i}].")
        else:
            found.append((key, value, kind))
    return found


def assert_valid(cfg: RunConfig) -> None:
    assert not type_errors(cfg), type_errors(cfg)
    assert not broken_rules(cfg), broken_rules(cfg)


def _loads_or_fails_cleanly(files: list[str], overrides: list[str]) -> None:
    try:
        cfg = load_config(files, overrides)
    except ConfigError as e:
        message = str(e)
        assert message and "\n" not in message, f"not one line: {message!r}"
        return
    assert_valid(cfg)


def _refused_naming(overrides: list[str], key: str) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(BASE, overrides)
    message = str(e.value)
    assert "\n" not in message and key in message, (overrides, message)
    return message


VALID = load_config(BASE, ["model.rope_scaling.factor=8.0"])  # every key has a value: the optional section too
assert_valid(VALID)  # the rules above agree with the presets
LEAVES = {key: kind for key, _, kind in leaves(VALID)}
KEYS = sorted({key.split("[")[0] for key in LEAVES})  # data.datasets[0].path: data.datasets
# Half the keys drawn are ones the relations involve: configs that only just load are common.
RELATED = sorted({key for _, keys in _relations(VALID) for key in keys} - {"data.datasets"})
some_key = st.one_of(st.sampled_from(RELATED), st.sampled_from(KEYS))

scalar = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(alphabet=string.printable, max_size=12),
    st.sampled_from(["", "null", "~", "[", "{", "]", "}", "a: b", "'", '"', "${oops}", "${train.lr}", "1e400",
                     "-0", "0x10", ".inf", "NaN", "yes", "on", "08", "1_000"]),
)
value = st.recursive(scalar, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                   st.dictionaries(st.text(string.ascii_lowercase, max_size=5),
                                                                   inner, max_size=3)), max_leaves=5)
key = st.one_of(st.sampled_from(KEYS), st.text(alphabet=string.ascii_lowercase + "._[]0", min_size=1, max_size=20))
# Values near the edges of the rules (zero, one, small divisors, each enumerated value), so that configs that
# load are often only just valid and the rules between keys are exercised.
edge = st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 4, 8, 16, 32, 64, 256, 0.0, 0.5, 1.0, 1.5, True, False]),
                 st.sampled_from(sorted({str(v) for values in ENUMERATED.values() for v in values})))


@fast(60)
@given(st.lists(st.tuples(key, value), max_size=4))
def test_random_overrides_load_valid_or_fail_with_one_line(pairs):
    _loads_or_fails_cleanly(BASE, [f"{k}={v}" for k, v in pairs])


@fast(80)
@given(st.lists(st.tuples(some_key, edge), min_size=1, max_size=3))
def test_overrides_near_the_edges_load_valid_or_fail_with_one_line(pairs):
    _loads_or_fails_cleanly(BASE, [f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in pairs])


@fast(40)
@given(st.text(max_size=200))
def test_random_override_strings_load_valid_or_fail_with_one_line(text):
    _loads_or_fails_cleanly(BASE, [text])


@fast(40)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=200).map(lambda b: b.decode("latin-1"))))
def test_random_yaml_files_load_valid_or_fail_with_one_line(tmp_path, text):
    path = tmp_path / "random.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    _loads_or_fails_cleanly([*BASE, str(path)], [])


@fast(4)
@pytest.mark.parametrize("key", sorted(ENUMERATED))
@given(text=st.text(string.ascii_letters + string.digits + "-_", min_size=1, max_size=12))
def test_a_value_outside_an_enumerated_set_is_refused_naming_the_key_and_the_set(key, text):
    if text in ENUMERATED[key]:
        return
    message = _refused_naming([f"{key}='{text}'"], key)  # quoted: a string, even "2" for the ZeRO stage
    assert message.endswith(f" is not one of {', '.join(str(v) for v in LEAVES[key].__args__)}"), message
    assert set(LEAVES[key].__args__) == ENUMERATED[key]


def _out_of_range(key: str) -> st.SearchStrategy[Any]:
    """Numbers of the key's type that break its range: <= 0 for a positive key, < 0 for the others."""
    low = 0 if key in POSITIVE else -1
    if LEAVES[key.replace("[]", "[0]")] is int:
        return st.integers(max_value=low)
    return st.one_of(st.floats(max_value=low, allow_infinity=True), st.just(math.nan))


@fast(2)
@pytest.mark.parametrize("key", sorted(POSITIVE | NOT_NEGATIVE))
@given(data=st.data())
def test_a_number_out_of_its_keys_range_is_refused_naming_the_key(key, data):
    number = data.draw(_out_of_range(key))
    written = {math.inf: ".inf", -math.inf: "-.inf"}.get(number, ".nan" if number != number else repr(number))
    if "[]" in key:  # an entry of the datasets
        head, name = key.split("[].")
        _refused_naming([f"{head}=[{{path: d, {name}: {written}}}]"], key.replace("[]", "[0]"))
    else:
        _refused_naming([f"{key}={written}"], key)


def _typo(name: str, draw: Any) -> str:
    """`name` with one letter dropped, added, changed, or swapped with the next."""
    i = draw(st.integers(0, len(name) - 1))
    letter = draw(st.sampled_from(string.ascii_lowercase))
    return draw(st.sampled_from([name[:i] + name[i + 1:], name[:i] + letter + name[i:],
                                 name[:i] + letter + name[i + 1:], name[:i] + name[i + 1:i + 2] + name[i] + name[i + 2:]]))


@st.composite
def typos(draw: Any) -> tuple[str, str, str]:
    """(a real key with one typo in its own name or its section's, the unknown key as the message names it, the key
    meant)."""
    real = draw(st.sampled_from(KEYS))
    if draw(st.booleans()):
        section, name = real.rsplit(".", 1)
        unknown = f"{section}.{_typo(name, draw)}"
        return unknown, unknown, real
    top, rest = real.split(".", 1)
    unknown = _typo(top, draw)
    return f"{unknown}.{rest}", unknown, top


@fast(50)
@given(typos())
def test_a_typo_of_a_real_key_is_refused_naming_it_and_the_key_meant(typo):
    override, unknown, meant = typo
    if any(key == unknown or key.startswith(unknown + ".") for key in KEYS):
        return  # the typo made another real key or section
    message = _refused_naming([f"{override}=1"], f"unknown config key '{unknown}': ")
    listed = message.split(" are ", 1)[1].split(", ") if " are " in message else []
    assert message.endswith(f"did you mean '{meant}'?") or meant.rsplit(".", 1)[-1] in listed, message


# `validate` alone, on configs changed directly: refused exactly when a rule above is broken.
def _number(kind: Any) -> st.SearchStrategy[Any]:
    """Numbers of `kind` near the edges of the rules: signs, small divisors, powers of two, non-finite floats."""
    if kind is int:
        return st.one_of(st.sampled_from([-1, 0, 1, 2, 3, 4, 6, 8, 16, 32, 64, 128, 256, 1024, 2048, 32768]),
                         st.integers(-2, 66))
    return st.one_of(st.floats(-1.0, 5.0), st.sampled_from([0.0, 1.0, math.nan, math.inf, -math.inf]))


def _typed(kind: Any) -> st.SearchStrategy[Any] | None:
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Literal:
        return st.sampled_from(args)  # a value outside the set is omegaconf's to refuse (tested above)
    if origin is list and args[0] is float:
        return st.lists(_number(float), max_size=3)
    if kind in (int, float):
        return _number(kind)
    return st.booleans() if kind is bool else None


MUTABLE = {key: kind for key, kind in LEAVES.items() if "[" not in key and _typed(kind) is not None}
RELATIONS = sorted({tuple(sorted(keys)) for _, keys in _relations(VALID) if keys <= MUTABLE.keys()})
datasets = st.lists(st.builds(DatasetConfig, path=st.just("d"), weight=_number(float)), max_size=2)


@fast(25)
@pytest.mark.parametrize("keys", RELATIONS, ids=["+".join(keys) for keys in RELATIONS])
@given(data=st.data())
def test_validate_refuses_exactly_the_configs_that_break_a_rule_naming_a_key_of_one(keys, data):
    """New values for the keys of one relation, perhaps for another key and for the datasets: `validate` must
    refuse the config if and only if it breaks a rule."""
    others = data.draw(st.lists(st.sampled_from(sorted(MUTABLE)), max_size=1))
    cfg = copy.deepcopy(VALID)
    for key in [*keys, *others]:
        section, name = key.rsplit(".", 1)
        setattr(functools.reduce(getattr, section.split("."), cfg), name, data.draw(_typed(MUTABLE[key]), label=key))
    cfg.data.datasets = data.draw(st.one_of(st.just(cfg.data.datasets), datasets), label="data.datasets")
    broken = broken_rules(cfg)
    try:
        validate(cfg)
    except ConfigError as e:
        message = str(e)
        assert broken, f"refused a valid config: {message}"
        assert "\n" not in message and any(k in message for involved in broken for k in involved), (message, broken)
        return
    assert not broken, f"accepted a config that breaks {broken}"


@pytest.mark.parametrize("override", ["train.lr=abc", "model.num_heads=3.5", "unknown.key=1", "train=5",
                                      "data.datasets=oops", "launch.slurm.env=[1, 2]", "train.betas=[0.9]"])
def test_known_bad_overrides_fail_with_one_line(override):
    with pytest.raises(ConfigError) as e:
        load_config(BASE, [override])
    assert "\n" not in str(e.value)
