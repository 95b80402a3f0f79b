"""Which dataset an `--in` path means: never several mixed together.

- a file, or a directory with a manifest (`.magpie/manifest.json`): itself;
- the output folder of `magpie run` (it holds `recipe.yaml`): its final dataset, the step named
  `final` in `.magpie/run.json` (`pairs/` for runs that predate step recipes);
- a folder whose datasets sit in subfolders: refused when it holds more than one (naming them),
  resolved to the one when it holds exactly one;
- anything else (plain Parquet/JSONL files, a Hugging Face download): itself.

Paths may be object-store URIs (`s3://bucket/prefix`, see magpie.fs): the same rules apply.
"""

from __future__ import annotations

from pathlib import Path

from magpie.errors import MagpieError
from magpie.fs import as_path

MANIFEST = Path(".magpie") / "manifest.json"
EXPORT_MANIFEST = Path(".magpie") / "export.json"
RUN_FINAL = "pairs"  # the last dataset stage of `magpie run`


def _is_dataset(path: Path) -> bool:
    return (path / MANIFEST).is_file() or (path / EXPORT_MANIFEST).is_file()


def _datasets_under(root: Path) -> list[Path]:
    """Dataset folders below `root` (not descending into a dataset or a hidden folder)."""
    found: list[Path] = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if _is_dataset(child):
            found.append(child)
        else:
            found.extend(_datasets_under(child))
    return found


def short_note(path: Path) -> str | None:
    """A warning when `path` is a dataset that a spent budget left short of its target."""
    import json

    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    short = manifest.get("short")
    if not short:
        return None
    return (
        f"{path} is short: {short.get('rows')} of {short.get('wanted')} rows (its budget was "
        f"spent; {short.get('fix', 'rerun it with a larger budget')}); using the rows it has"
    )


def _run_final(path: Path) -> str:
    """The step folder a `magpie run` output records as its result (see magpie.recipe)."""
    import json

    try:
        final = json.loads((path / ".magpie" / "run.json").read_text()).get("final")
    except (OSError, ValueError, AttributeError):
        final = None
    return final if isinstance(final, str) and "/" not in final and final else RUN_FINAL


def resolve_dataset(path: Path) -> tuple[Path, str | None]:
    """The one dataset `path` stands for, and a one-line note when that is not `path` itself.

    Raises MagpieError for a folder holding several datasets. `short_note(dataset)` tells
    whether the dataset it resolved to is short.
    """
    path = as_path(path)
    if not path.is_dir() or _is_dataset(path):
        return path, None
    final = path / _run_final(path)
    if (path / "recipe.yaml").is_file() and _is_dataset(final):
        return final, f"{path} is a `magpie run` output: reading its final dataset {final}"
    if any(p.suffix in {".parquet", ".jsonl", ".json"} for p in path.iterdir() if p.is_file()):
        return path, None
    datasets = _datasets_under(path)
    if len(datasets) > 1:
        names = ", ".join(str(d.relative_to(path)) for d in datasets[:8])
        more = f" and {len(datasets) - 8} more" if len(datasets) > 8 else ""
        raise MagpieError(
            f"{path} holds several datasets ({names}{more}): pass one of them as --in"
        )
    if len(datasets) == 1:
        return datasets[0], f"{path} holds one dataset: reading {datasets[0]}"
    return path, None
