"""Prepare .gpu/ (ignored by git) for deploy/gpu/check.sh, which runs on a GPU machine without network.

That machine has Python 3.12 with torch, triton and many common packages (IMAGE below: what the device
tool's machines list), but none of this project's service packages. This downloads wheels of the rest
of what the project and its tests import, at the versions of this checkout's .venv, for CPython 3.12
on manylinux x86-64; and saves the default model's tokenizer (the model's weights, 94 MB, do not fit
in what a device call carries: the check runs random weights with this tokenizer).

    .venv/bin/python deploy/gpu/pack.py   (make gpu-pack)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / ".gpu"
# What the tests need beyond the project's own dependencies.
WANTED = ["distserve", "pytest-asyncio", "openai"]
# On the GPU machine's image already (or not wanted there: ucxx's CUDA 12 build; the tcp transport runs).
IMAGE = {
    "anyio", "certifi", "charset-normalizer", "click", "filelock", "fsspec", "h11", "hf-xet", "httpcore", "httpx",
    "huggingface-hub", "idna", "iniconfig", "jinja2", "markupsafe", "markdown-it-py", "mdurl", "numpy", "packaging",
    "pluggy", "prometheus-client", "pygments", "pytest", "pytest-timeout", "pyyaml", "regex", "requests", "rich",
    "safetensors", "tiktoken", "tokenizers", "torch", "tqdm", "triton", "typing-extensions", "urllib3", "uvloop",
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pillow", "pyparsing", "python-dateutil", "six",
    "zipp", "ucxx-cu12", "libucxx-cu12", "ucx-py-cu12", "libucx-cu12", "rapids-logger", "gguf", "setuptools",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64", "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_24_x86_64"]
ENVIRONMENT = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
               "sys_platform": "linux", "platform_machine": "x86_64", "extra": ""}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(names: list[str]) -> dict[str, str]:
    """Name -> installed version of every distribution `names` need (their extras included where named)."""
    found: dict[str, str] = {}
    todo = [Requirement(n) for n in names]
    while todo:
        req = todo.pop()
        name = canonical(req.name)
        if name in found or name in IMAGE or (req.marker and not req.marker.evaluate(ENVIRONMENT)):
            continue
        dist = metadata.distribution(name)
        found[name] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            extras = [e for e in req.extras]
            if sub.marker and not any(sub.marker.evaluate({**ENVIRONMENT, "extra": e}) for e in ["", *extras]):
                continue
            sub.marker = None
            todo.append(sub)
    found.pop("distserve")  # the checkout itself travels
    return found


def main() -> int:
    shutil.rmtree(OUT, ignore_errors=True)
    (OUT / "wheels").mkdir(parents=True)
    pins = [f"{name}=={version}" for name, version in sorted(closure(WANTED).items())]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                           "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(OUT / "wheels"),
                           *pins], capture_output=True, text=True)
    if done.returncode:
        print(done.stderr, file=sys.stderr)
        return 1
    from shared.tokenizer import load_tokenizer  # the default model's, as the engine reads it

    (OUT / "tokenizer").mkdir()
    load_tokenizer("default").backend.save(str(OUT / "tokenizer" / "tokenizer.json"))
    size = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"{OUT}: {len(pins)} wheels and the tokenizer, {size / 2**20:.1f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
