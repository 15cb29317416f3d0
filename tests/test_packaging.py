"""``kernels/`` ships as ``fastrms.kernels``, from an editable install and from a built wheel."""

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

    site = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
         str(wheel)],
        check=True,
    )  # fmt: skip
    code = (
        "import json, numpy as np, fastrms, fastrms.kernels.rules as r;"
        "p = np.ones(8, np.float32); fastrms.SGD(p, lr=0.5).step(np.ones(8, np.float32));"
        "print(json.dumps([fastrms.__file__, r.__file__, float(p[0])]))"
    )
    env = {**os.environ, "PYTHONPATH": str(site)}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        check=True,
    )  # fmt: skip
    package, rules, p0 = json.loads(out.stdout)
    assert Path(package).is_relative_to(site) and Path(rules).is_relative_to(site)
    assert p0 == 0.5
    assert fastrms.__version__ in wheel.name
