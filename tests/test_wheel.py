"""The built wheel works on its own: installed (not editable) into a fresh environment, its
``subspace-jax`` command runs from another directory with nothing of the checkout in reach."""

import pathlib
import shutil
import site
import subprocess
import sys
import sysconfig

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run(*cmd, cwd, env=None):
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout}\n{out.stderr}"
    return out.stdout


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """A fresh venv with the wheel installed; its dependencies come from this environment's
    site-packages through a path file (so nothing is downloaded), which carries no
    ``subspace_jax`` of its own: this environment's copy is an editable hook that a path
    file does not run."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # the package sources as they are now, nothing else of the checkout
    for package in ("subspace_jax", "subspace_lab"):
        shutil.copytree(ROOT / package, src / package,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    dist = tmp / "dist"
    _run(sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", dist, src, cwd=tmp)
    (wheel,) = dist.glob("subspace_jax-*.whl")
    venv = tmp / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    purelib = _run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                   cwd=tmp).strip()
    deps = sorted({sysconfig.get_paths()["purelib"], *site.getsitepackages()})
    pathlib.Path(purelib, "deps.pth").write_text("\n".join(deps) + "\n")
    _run(sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
         "--no-index", wheel, cwd=tmp)
    elsewhere = tmp / "elsewhere"
    elsewhere.mkdir()
    return venv, elsewhere, wheel


def test_wheel_holds_the_library_and_the_lab(fresh):
    import zipfile

    _, _, wheel = fresh
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("subspace_jax/forms.py", "subspace_jax/wasi/__init__.py",
                   "subspace_lab/cli.py", "subspace_lab/experiments/wasi_finetune.py"):
        assert needed in names, needed
    assert not [n for n in names if n.startswith(("tests/", "experiments/", "results/"))]


def test_installed_command_runs_from_another_directory(fresh):
    venv, elsewhere, _ = fresh
    where = _run(venv / "bin" / "python", "-c",
                 "import subspace_jax, subspace_lab, sys; print(subspace_jax.__file__); "
                 "print(subspace_lab.__file__); from subspace_lab import cli; "
                 "sys.exit(cli.main(['run', '--list']))", cwd=elsewhere).splitlines()
    assert all(str(venv) in line for line in where[:2]), where  # the wheel's, not ours
    assert "nested_finetune" in "\n".join(where[2:])
    command = venv / "bin" / "subspace-jax"
    assert "--methods" in _run(command, "demo", "--help", cwd=elsewhere)
    listing = _run(command, "bench", "--list", cwd=elsewhere)
    assert "subspace-jax run wasi_finetune" in listing and "lorapre" in listing
    assert not (elsewhere / "results").exists()  # nothing was written by listing
