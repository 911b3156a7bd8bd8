"""Packaging: the wheel holds every module and every shipped model file under weights/, and a
non-editable install of it loads an embedded model from outside the repository.

The wheel is built once per module, offline (``--no-build-isolation --no-index``: the installed
setuptools builds it), from a fresh copy of the project in a temporary folder: building in the
checkout would leave ``build/`` and ``*.egg-info`` there, and setuptools packs a stale
``build/lib`` (modules since moved or deleted) into later wheels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "src" / "lisa_control"
WEIGHTS = PACKAGE / "weights"
_SKIP_DIRS = {"__pycache__"}
_TIMEOUT = 300


def _files_under(root: Path, suffix: str = "") -> list[str]:
    """Relative posix paths of the files under ``root`` (hidden names, which package-data globs
    never match, and bytecode caches left out)."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in files:
            if not name.startswith(".") and name.endswith(suffix):
                found.append((Path(folder) / name).relative_to(root).as_posix())
    return sorted(found)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _env() -> dict[str, str]:
    """The environment without PYTHONPATH (tests run with PYTHONPATH=src) or PYTHONHOME."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _run(args, cwd, what: str) -> subprocess.CompletedProcess:
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, env=_env(), capture_output=True, text=True,
        timeout=_TIMEOUT,
    )
    assert done.returncode == 0, (
        f"{what} failed ({done.returncode}):\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"
    project.mkdir()
    # What the build reads: the top-level files (pyproject.toml, README.md, MANIFEST.in, ...)
    # and src/; not the tests, benchmarks or a CI venv that may live in the checkout.
    for item in REPO.iterdir():
        if item.is_file():
            shutil.copy2(item, project / item.name)
    shutil.copytree(
        REPO / "src", project / "src",
        ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"),
    )
    out = tmp / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation",
         "--no-index", "-q", "-w", out],
        # --no-build-isolation builds with this environment's setuptools (>=68, and wheel
        # below setuptools 70.1): the test extra lists both.
        cwd=project, what="pip wheel (needs setuptools>=68 and wheel here: pip install '.[test]')",
    )
    wheels = sorted(out.glob("lisa_control-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {out}, found {wheels}"
    return wheels[0]


def test_wheel_ships_every_file_under_weights_byte_identical(wheel):
    shipped = _files_under(WEIGHTS)
    assert any(p.endswith(".safetensors") for p in shipped), f"no .safetensors under {WEIGHTS}"
    assert "index.json" in shipped
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        missing = [p for p in shipped if f"lisa_control/weights/{p}" not in names]
        assert not missing, f"{wheel.name} lacks these files of {WEIGHTS}: {missing}"
        differing = [
            p for p in shipped
            if _sha256(zf.read(f"lisa_control/weights/{p}")) != _sha256((WEIGHTS / p).read_bytes())
        ]
    assert not differing, f"files in {wheel.name} differ from the source: {differing}"


def test_wheel_ships_every_python_module(wheel):
    modules = _files_under(PACKAGE, ".py")
    assert "__init__.py" in modules and "loading.py" in {Path(m).name for m in modules}
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
    missing = [m for m in modules if f"lisa_control/{m}" not in names]
    # A sub-folder without __init__.py is not found by packages.find and would land here.
    assert not missing, f"{wheel.name} lacks these modules of {PACKAGE}: {missing}"


# Run with ``python -I`` (no PYTHONPATH, no script dir, no user site) from a folder outside the
# repository; prints where everything came from so the test can check it is the installed copy.
_LOAD_SCRIPT = r"""
import json, sysconfig
import lisa_control
from lisa_control.families.loading import load_main_model

model = load_main_model("embedded:pose")
print(json.dumps({
    "package": lisa_control.__file__,
    "loader": load_main_model.__module__,
    "purelib": sysconfig.get_paths()["purelib"],
    "source": str(model.source),
    "resolution": model.resolution,
    "parameters": sum(p.numel() for p in model.main_network.parameters()),
}))
"""


def test_venv_install_of_wheel_loads_embedded_pose_outside_repo(wheel, tmp_path):
    venv = tmp_path / "venv"
    # --system-site-packages: torch and diffusers come from the interpreter running the tests.
    _run([sys.executable, "-m", "venv", "--system-site-packages", venv], tmp_path, "venv")
    bin_dir = venv / ("Scripts" if os.name == "nt" else "bin")
    python = bin_dir / ("python.exe" if os.name == "nt" else "python")
    purelib = Path(
        _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
             tmp_path, "venv purelib").stdout.strip()
    )
    if sys.prefix != sys.base_prefix:
        # The tests run in a venv themselves (CI's .ci-venv): --system-site-packages points at
        # the base interpreter, not at it, so add its site-packages after the new venv's own.
        lines = [f"import site; site.addsitedir({d!r})" for d in site.getsitepackages()]
        (purelib / "_outer_env.pth").write_text("\n".join(lines) + "\n")
    _run(
        [python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q",
         wheel],
        tmp_path, "pip install of the wheel",
    )
    assert (bin_dir / ("lisa.exe" if os.name == "nt" else "lisa")).is_file(), "no `lisa` script"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = _run([python, "-I", "-c", _LOAD_SCRIPT], elsewhere, "loading embedded:pose")
    info = json.loads(done.stdout.strip().splitlines()[-1])

    installed = Path(info["purelib"]).resolve() / "lisa_control"
    assert Path(info["purelib"]).resolve() == purelib.resolve()
    # The wheel's copy, not the checkout nor an editable install of it.
    assert Path(info["package"]).resolve().parent == installed, info
    assert Path(info["source"]).resolve().is_relative_to(installed / "weights"), info
    assert info["parameters"] > 0, info
    assert info["resolution"] == 32, info
