"""The package as pip installs it: every package folder listed in pyproject.toml, and a built wheel that carries the
shipped configs, so ``load_config("tiny")`` works from an installed copy, away from any checkout; the benchmark
there keeps its data, runs and results in the current folder (never in site-packages) and skips the C++ runner,
whose sources only a checkout has."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

from qd_core.config import CONFIG_DIR, dump_config, load_config

ROOT = Path(__file__).resolve().parent.parent
TOP_PACKAGES = ("qd_core", "kernels", "export", "train", "bench")


def listed_packages() -> list[str]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def test_every_package_folder_is_listed_in_pyproject():
    found = {".".join(p.parent.relative_to(ROOT).parts) for top in TOP_PACKAGES
             for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    # qd_core.configs is the top-level configs/ folder, mapped into the package by [tool.setuptools.package-dir].
    assert set(listed_packages()) == found | {"qd_core.configs"}


def test_installed_wheel_ships_and_loads_every_config(tmp_path):
    # Built from a copy: setuptools writes build/ into the source tree it builds.
    src = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "results")
    for name in (*TOP_PACKAGES, "configs"):
        shutil.copytree(ROOT / name, src / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(src), "-w", str(tmp_path / "wheel")],
                   check=True, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("querydiff-*.whl")
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, capture_output=True)

    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    assert {"tiny", "vitl16_512"} <= set(names)
    script = ("import json, sys, qd_core; from qd_core.config import dump_config, load_config\n"
              "import bench.cli, bench.evalset, bench.settings\n"
              "from bench.backends import BACKENDS, unavailable_reason\n"
              "from bench.native import native_sources\n"
              "qd = next(s for s in BACKENDS if s.name == 'qd-infer')\n"
              "json.dump({'file': qd_core.__file__, 'configs': {n: dump_config(load_config(n)) for n in sys.argv[1:]},"
              " 'root': str(bench.settings.REPO_ROOT), 'out': str(bench.cli.DEFAULT_OUT.resolve()),"
              " 'data': str(bench.evalset.DEFAULT_ROOT), 'native': native_sources() is None,"
              " 'qd_infer': unavailable_reason(qd, bench.settings.settings_from_env({}))}, sys.stdout)")
    away = tmp_path / "elsewhere"
    away.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run([sys.executable, "-c", script, *names], cwd=away, env=env, check=True, capture_output=True,
                         text=True)
    result = json.loads(out.stdout)
    assert Path(result["file"]).is_relative_to(site)  # the installed copy, not the checkout
    assert result["configs"] == {n: dump_config(load_config(n)) for n in names}
    assert result["root"] == str(away) and result["out"] == str(away / "bench-results")
    assert result["data"] == str(away / "data" / "bench-synthetic")
    assert result["native"] and "source checkout" in result["qd_infer"]
