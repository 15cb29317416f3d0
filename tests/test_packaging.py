"""``kernels/`` ships as ``fastrms.kernels``, from an editable install and from a built wheel,
with the tools (``fastrms.tools``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import fastrms

ROOT = Path(__file__).resolve().parents[1]


def test_the_installed_package_imports_its_kernels():
    import fastrms.kernels.rules

    kernels = Path(fastrms.kernels.__file__).parent
    assert (kernels / "rules.py").is_file()
    assert Path(fastrms.kernels.rules.__file__).parent == kernels


@pytest.mark.slow
def test_a_built_wheel_contains_and_imports_the_kernels(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(tmp_path / "dist"), str(ROOT)],
        check=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("fastrms-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for module in ("rules", "cpu", "cuda", "_options"):
        assert f"fastrms/kernels/{module}.py" in names
    assert not any(n.startswith("kernels/") for n in names)
    # The tools (fastrms bench, fastrms demo) ship as subpackages of their own.
    for tool in ("__init__", "bench/__init__", "bench/command", "demo/__init__", "demo/command"):
        assert f"fastrms/tools/{tool}.py" in names

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        check=True,
    )  # fmt: skip
    code = (
        "import json, numpy as np, fastrms, fastrms.kernels.rules as r;"
        "import fastrms.tools.bench.command, fastrms.tools.demo.command;"
        "from fastrms.kernels._options import cache_dir;"
        "p = np.ones(8, np.float32); fastrms.SGD(p, lr=0.5).step(np.ones(8, np.float32));"
        "print(json.dumps([fastrms.__file__, r.__file__, float(p[0]), str(cache_dir())]))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_CACHE")}
    env.update(PYTHONPATH=str(site), XDG_CACHE_HOME=str(tmp_path / "user-cache"))

    def run(**more: str) -> tuple[str, str, float, Path]:
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, env={**env, **more},
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        package, rules, p0, cache = json.loads(out.stdout)
        return package, rules, p0, Path(cache)

    package, rules, p0, cache = run()
    assert Path(package).is_relative_to(site) and Path(rules).is_relative_to(site)
    assert p0 == 0.5
    assert fastrms.__version__ in wheel.name
    # The installed copy caches its kernels per user, never inside the package: files left
    # there outlive pip uninstall and turn the folder into a namespace package (issue 20).
    if sys.platform == "linux":
        assert cache == tmp_path / "user-cache" / "fastrms"
    assert cache_files(cache) and not cache_files(site)
    # NUMBA_CACHE_DIR still wins.
    *_, cache = run(NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"))
    assert cache == tmp_path / "numba-cache"
    assert cache_files(cache) and not cache_files(site)


def cache_files(folder: Path) -> list[Path]:
    """Numba's cache index and data files under ``folder``."""
    return [p for p in folder.rglob("*") if p.suffix in (".nbi", ".nbc")]


def test_a_source_tree_caches_beside_its_kernels():
    """In a source tree (an editable install) the cache stays in kernels/__pycache__, as Numba
    does by default; an installed copy is recognised by its kernels inside its package."""
    import numba

    import fastrms.kernels
    from fastrms.kernels import _options

    kernels = Path(fastrms.kernels.__file__).resolve().parent
    if kernels == ROOT / "kernels":
        assert _options._INSTALLED is None
        expected = Path(numba.config.CACHE_DIR) if numba.config.CACHE_DIR else None
        assert _options.cache_dir() == expected
    else:
        assert _options._INSTALLED == kernels.parent
