"""One import namespace: the installed packages are foundry.*, so a user's own `data` (or `launch`, ...)
package neither hides ours nor is hidden by it; and the command line answers without importing torch."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, data_args

PACKAGES = ("data", "parallel", "pretrain", "launch")


def _python(code: str, cwd: Path, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = str(pythonpath)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def test_only_the_foundry_namespace_is_installed(tmp_path):
    for name in PACKAGES:
        bare = _python(f"import {name}", cwd=tmp_path)
        assert bare.returncode != 0 and f"No module named '{name}'" in bare.stderr, (name, bare.stderr)
        ours = _python(f"import foundry.{name} as m; print(m.__file__)", cwd=tmp_path)
        assert ours.returncode == 0, ours.stderr
        assert Path(ours.stdout.strip()).parent == REPO / name


def test_a_user_project_with_its_own_data_package_still_trains(tmp_path, stdlib_shards):
    project = tmp_path / "my_project"
    for name in PACKAGES:  # every one of our folder names, each a package that must never be imported
        (project / name).mkdir(parents=True)
        (project / name / "__init__.py").write_text(f"raise ImportError('the user project\\'s own {name}')\n")
    env = {**os.environ, "PYTHONPATH": str(project), "OMP_NUM_THREADS": "1"}
    foundry = Path(sys.executable).parent / "foundry"  # the installed console script
    run_dir = project / "runs" / "x"
    proc = subprocess.run(
        [str(foundry), "train", str(REPO / "configs/models/tiny.yaml"), str(REPO / "configs/quickstart.yaml"),
         *data_args(stdlib_shards), "train.max_steps=2", "train.warmup_steps=1", "train.global_batch_size=4",
         "train.micro_batch_size=4", "data.seq_len=64", "data.workers=0", "tracking.mlflow=false",
         f"train.run_dir={run_dir}"],
        cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert (run_dir / "metrics.jsonl").read_text().count("\n") == 2


def test_the_command_line_parses_without_importing_torch(tmp_path):
    # `foundry --help` (and every command's argument errors) should answer at once: torch and DeepSpeed take
    # seconds to import, so only the command that runs imports them.
    proc = _python("import sys; from foundry.launch.cli import build_parser; build_parser(); "
                   "print(sorted(m for m in ('torch', 'deepspeed', 'mlflow', 'webdataset') if m in sys.modules))",
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_error_the_command_line_reports_in_one_line_exists():
    # The CLI names them by module and class (it must not import torch to name them): a renamed or moved
    # class would turn its one-line error back into a traceback.
    from foundry.launch.cli import EXPECTED_ERRORS

    for module, names, _, _ in EXPECTED_ERRORS:
        for name in names:
            assert issubclass(getattr(importlib.import_module(module), name), Exception), (module, name)
