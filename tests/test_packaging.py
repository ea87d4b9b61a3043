"""The repository stands alone: license, package metadata, extras, and a README whose install and
test commands are the ones CI runs (and that say how to get a CPU torch)."""

from __future__ import annotations

import re
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def test_license_file_is_mit_by_the_gradwatch_authors() -> None:
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 the gradwatch authors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS"' in text


def test_project_metadata() -> None:
    project = _pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert project["authors"] == [{"name": "the gradwatch authors"}]
    for name, url in project.get("urls", {}).items():  # none rather than empty or invented
        assert url.strip(), name


def test_lightning_extra_installs_both_lightning_packages() -> None:
    """The examples import ``lightning.pytorch``; older code ``pytorch_lightning``."""
    extra = _pyproject()["project"]["optional-dependencies"]["lightning"]
    assert "lightning>=2.1" in extra
    assert "pytorch-lightning>=2.1" in extra


def test_built_wheel_carries_license_authors_and_extras(tmp_path) -> None:
    builders = pytest.importorskip("hatchling.builders.wheel")
    (wheel,) = builders.WheelBuilder(str(ROOT)).build(directory=str(tmp_path),
                                                        versions=["standard"])
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        meta = Parser().parsestr(z.read(next(n for n in names if n.endswith(".dist-info/METADATA")))
                                 .decode("utf-8"))
        license_path = next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))
        assert z.read(license_path).decode("utf-8").startswith("MIT License")
    assert meta["License-Expression"] == "MIT"
    assert meta["Author"] == "the gradwatch authors"
    requires = meta.get_all("Requires-Dist")
    assert "lightning>=2.1; extra == 'lightning'" in requires
    assert "pytorch-lightning>=2.1; extra == 'lightning'" in requires


def _ci_test_command() -> str:
    lines = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    marker = next(i for i, line in enumerate(lines) if "README" in line and "verbatim" in line)
    return lines[marker + 1].strip()


def test_readme_test_command_is_the_one_ci_runs() -> None:
    command = _ci_test_command()
    assert "-c constraints.txt" in command and "pytest" in command
    assert command in [line.strip() for line in _readme().splitlines()]


def test_readme_says_how_to_get_a_cpu_torch_of_the_pinned_version() -> None:
    """The constraints file gives a CPU torch only where the local wheel is; elsewhere the
    README's first step installs the CPU build of the pinned version from PyTorch's CPU index,
    which then satisfies the pin (a different version would be replaced by PyPI's CUDA build)."""
    pins = [line for line in (ROOT / "constraints.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]
    (pin,) = [p for p in pins if p.startswith("torch==")]
    readme = _readme()
    quickstart = readme[readme.index("## Quickstart"):readme.index("## What it diagnoses")]
    cpu = [line for line in quickstart.splitlines()
           if "--index-url https://download.pytorch.org/whl/cpu" in line and "pip install" in line]
    assert cpu, "no CPU-index install command in the quickstart"
    assert any(f'"{pin}"' in line or f" {pin} " in line for line in cpu)
    # the CPU step comes before the commands that use the constraints file
    assert quickstart.index(cpu[0]) < quickstart.index("-c constraints.txt -e")


def test_readme_is_self_contained() -> None:
    """No references to files outside the repository (the essay, shared/seed)."""
    readme = _readme()
    assert "shared/" not in readme
    assert not re.search(r"\bessay", readme, re.IGNORECASE)
    # the three examples are explained in the README itself, with what torch really does
    assert "examples/seed_examples.py" in readme
    assert "element 0 of tensors does not require grad" in readme
    assert "stale_grad_accumulation" in readme and "inplace_no_grad" in readme
