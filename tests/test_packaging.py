"""The package as a user installs it: a wheel built from the repository, installed into a fresh venv.

The fresh venv gets only the wheel; its dependencies (torch, transformers, Axolotl) are borrowed from the test
environment's site-packages through a path file, so nothing is downloaded and no editable install (whose
finder lives in a .pth file that a plain path line does not run) can stand in for the wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import irtuning_plugin

REPO = Path(__file__).resolve().parent.parent
# What a source tree needs to build: skip the environments, results and tests.
SKIP = shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "__pycache__", "outputs", "benchmarks", "tests*",
                              ".pytest_cache", ".ruff_cache", "last_run_prepared")


@pytest.fixture(scope="module")
def fresh_install(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(REPO, src, ignore=SKIP, symlinks=True)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "-w", str(tmp / "dist")], check=True, timeout=600,
                   capture_output=True)
    (wheel,) = (tmp / "dist").glob("irtuning-*.whl")
    venv = tmp / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    subprocess.run([*pip, "--python", str(python), "install", "--no-deps", str(wheel)], check=True, timeout=600,
                   capture_output=True)
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    (Path(purelib) / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AXOLOTL_DO_NOT_TRACK": "1"}
    env.pop("PYTHONSAFEPATH", None)
    return {"wheel": wheel, "bin": venv / "bin", "purelib": Path(purelib), "env": env, "cwd": tmp}


def _run(fresh, *args, timeout=300):
    return subprocess.run(list(args), capture_output=True, text=True, env=fresh["env"], cwd=fresh["cwd"],
                          timeout=timeout)


def test_wheel_installs_the_package_and_its_data(fresh_install):
    proc = _run(fresh_install, str(fresh_install["bin"] / "python"), "-c",
                "import irtuning_plugin, irtuning_kernels; print(irtuning_plugin.__file__); "
                "print(irtuning_kernels.__file__); print(irtuning_plugin.__version__)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    plugin_file, kernels_file, version = proc.stdout.split()
    assert Path(plugin_file).is_relative_to(fresh_install["purelib"])  # the wheel's copy, not the checkout
    assert Path(kernels_file).is_relative_to(fresh_install["purelib"])
    assert version == irtuning_plugin.__version__ and fresh_install["wheel"].name.startswith(f"irtuning-{version}-")
    recipe = fresh_install["purelib"] / "irtuning_plugin" / "recipes" / "demo-smollm2-ir.yaml"
    assert recipe.is_file() and not recipe.is_symlink()
    assert recipe.read_text() == (REPO / "yaml_recipes" / "demo-smollm2-ir.yaml").read_text()
    archs = list((fresh_install["purelib"] / "irtuning_plugin" / "planner" / "architectures").glob("*.json"))
    assert archs, "the planner's architectures are not in the wheel"


def test_cli_runs_from_the_wheel(fresh_install):
    irtuning = str(fresh_install["bin"] / "irtuning")
    proc = _run(fresh_install, irtuning, "--help")
    assert proc.returncode == 0 and "irtuning" in proc.stdout, proc.stderr[-2000:]
    proc = _run(fresh_install, irtuning, "keys")
    assert proc.returncode == 0 and "| `irtuning_strategy` |" in proc.stdout, proc.stderr[-2000:]
    proc = _run(fresh_install, irtuning, "demo", "--help")
    recipe = fresh_install["purelib"] / "irtuning_plugin" / "recipes" / "demo-smollm2-ir.yaml"
    assert proc.returncode == 0 and str(recipe).replace(" ", "") in proc.stdout.replace("\n", "").replace(" ", "")


@pytest.mark.slow
def test_check_of_the_packaged_demo_recipe_from_the_wheel(fresh_install):
    recipe = fresh_install["purelib"] / "irtuning_plugin" / "recipes" / "demo-smollm2-ir.yaml"
    proc = _run(fresh_install, str(fresh_install["bin"] / "irtuning"), "check", str(recipe), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "irtuning check: ok (irtuning_strategy ir, scope adapter)" in proc.stdout


def test_repository_root_on_sys_path_shadows_nothing():
    """kernels/ has no __init__.py: from the repository root, `import kernels` still finds Hugging Face's package
    (Axolotl imports it) and `irtuning_kernels` is ours, with no PYTHONSAFEPATH or sys.path edits."""
    env = dict(os.environ)
    env.pop("PYTHONSAFEPATH", None)
    code = ("import sys, importlib.util; assert sys.path[0] == ''; import irtuning_kernels; print(irtuning_kernels.__file__); "
            "spec = importlib.util.find_spec('kernels'); "
            "print(spec.origin if spec and spec.origin else 'namespace:' + ','.join(spec.submodule_search_locations))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ours, theirs = proc.stdout.split()
    assert Path(ours).parent.name == "irtuning_kernels" and Path(ours).parent.parent.name == "kernels"
    if theirs.startswith("namespace:"):
        pytest.skip("Hugging Face's kernels is not installed in this environment")
    assert not Path(theirs).is_relative_to(REPO / "kernels") and Path(theirs).parent.parent.name == "site-packages", theirs


def test_wheel_ships_the_tasks_apart_from_the_plugin(fresh_install):
    tasks = fresh_install["purelib"] / "irtuning_plugin" / "tasks"
    for name in ("commands.py", "evaluation.py", "assets/references.py", "assets/revision_data/labels/style.py",
                 "converters/xlsx.py"):
        assert (tasks / name).is_file(), name
    code = ("import sys, irtuning_plugin.cli, irtuning_plugin.callback, irtuning_plugin.axolotl_integration.plugin; "
            "print([m for m in sys.modules if m.startswith('irtuning_plugin.tasks')])")
    proc = _run(fresh_install, str(fresh_install["bin"] / "python"), "-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr[-2000:] + proc.stdout


@pytest.mark.slow
def test_check_from_the_wheel_names_the_command_that_builds_a_missing_asset(fresh_install, tmp_path):
    recipe = fresh_install["purelib"] / "irtuning_plugin" / "recipes" / "demo-smollm2-ir.yaml"
    cache = tmp_path / "empty-cache"
    env = {**fresh_install["env"], "IRTUNING_CACHE": str(cache)}
    proc = subprocess.run([str(fresh_install["bin"] / "irtuning"), "check", str(recipe)], capture_output=True, text=True,
                          env=env, cwd=fresh_install["cwd"], timeout=600)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "build it with `irtuning prepare irtuning://smollm2-135m-instruct`" in lines[-1], \
        proc.stderr[-3000:]
    assert not cache.exists()  # the plugin never builds
