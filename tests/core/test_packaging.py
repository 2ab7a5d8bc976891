"""The package installs under one namespace: ``coe`` (with coe.routers, coe.adapters,
coe.serving, coe.configs mapped from the fixed top-level folders), and a wheel carries the
embedded default config and the shipped adapters."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAPPED = {"coe": "coe", "coe.routers": "routers", "coe.adapters": "adapters", "coe.serving": "serving"}


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_package_list_matches_the_tree():
    """Every folder with an ``__init__.py`` under a mapped root is listed (and nothing else)."""
    tool = _pyproject()["tool"]["setuptools"]
    want = {"coe.configs"}
    for name, folder in MAPPED.items():
        assert tool["package-dir"][name] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            want.add(".".join([name, *rel.parts]) if rel.parts else name)
    assert set(tool["packages"]) == want


def test_imports_come_from_the_coe_namespace():
    import coe.routers
    import coe.serving

    assert Path(coe.routers.__file__).parent == ROOT / "routers"
    assert Path(coe.serving.__file__).parent == ROOT / "serving"
    code = (ROOT / "coe").rglob("*.py")
    for folder in [*MAPPED.values(), "bench", "tests"]:
        code = [*code, *(ROOT / folder).rglob("*.py")]
    bad = []
    for path in code:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            s = line.strip()
            for top in ("routers", "adapters", "serving"):
                if s.startswith((f"from {top}.", f"from {top} ", f"import {top}.", f"import {top}")):
                    bad.append(f"{path.relative_to(ROOT)}:{n}: {s}")
    assert not bad, "import through coe.<package>:\n" + "\n".join(bad)


def test_default_config_is_package_data():
    from coe.config import load_config
    from coe.paths import default_config_path

    path = default_config_path()
    assert path.name == "default.yaml" and path.is_file()
    cfg = load_config(None)
    assert cfg.experts


@pytest.mark.slow
def test_wheel_installs_alone(tmp_path):
    """A non-editable build: the wheel has only ``coe`` at top level, the default config and the
    shipped adapters, and ``coe config validate`` runs from it without the checkout."""
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("coe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"coe"}
    assert "coe/configs/default.yaml" in names
    assert "coe/adapters/experts/math/adapter_model.safetensors" in names
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
    )
    # -S: no site-packages .pth files, so the checkout's editable finder is not installed; the
    # dependencies still come from this environment's site-packages, after the wheel.
    site = sysconfig.get_paths()["purelib"]

    def run_installed(body: str, *args: str) -> str:
        code = ("import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; "
                "import coe; assert coe.__file__.startswith(sys.argv[1]), coe.__file__\n" + body)
        out = subprocess.run([sys.executable, "-S", "-c", code, str(target), site, *args], check=False, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout

    assert "serve" in run_installed("from coe.tools.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    assert "valid" in run_installed("from coe.tools.cli import main; sys.exit(main(['config', 'validate']))")
    # the embedded config's relative paths land in the installed package, and what they name is there
    run_installed(
        "from pathlib import Path\n"
        "from coe.config import load_config\n"
        "from coe.routers import check_router_config, load_router\n"
        "cfg = load_config()\n"
        "check_router_config(cfg.router)\n"
        "inside = Path(sys.argv[1]).resolve() / 'coe'\n"
        "adapters = [Path(e.adapter) for e in cfg.experts if e.kind == 'lora']\n"
        "assert adapters and all(inside in a.parents and (a / 'adapter_model.safetensors').is_file() for a in adapters)\n"
        "assert inside in Path(cfg.router.fitted).parents\n"
        "router, meta = load_router(cfg.router.fitted)\n"
        "assert router.name == cfg.router.name and router.experts, router.experts\n"
    )
    # `coe k8s render` maps the installed package's files to the repository folders of the image,
    # so it writes what the checkout writes (k8s/base is that render)
    run_installed("from coe.tools.cli import main; sys.exit(main(['k8s', 'render', '--out', sys.argv[3]]))",
                  str(tmp_path / "k8s"))
    assert _manifest(tmp_path / "k8s" / "rayservice.yaml") == _manifest(ROOT / "k8s" / "base" / "rayservice.yaml")


def _manifest(path: Path) -> list:
    import yaml

    return list(yaml.safe_load_all(path.read_text()))
