"""Dataset card: Hugging Face YAML front matter, a body a person reads, and PNG plots.

`write_card(D)` writes `D/README.md` and `D/plots/*.png` for a directory of Parquet shards (ours or
any other). The front matter follows the Hub's dataset-card format, with `configs.data_files`
naming the shard files so `datasets.load_dataset(D)` reads D as it is. The body walks the chain of
manifests that made D (instructions -> responses -> score -> pairs, tags, filters) for the models,
templates, sampling settings and counts, then shows the distributions as tables and plots.

Every string a model wrote is escaped before it reaches the Markdown (the Hub renders HTML in
Markdown), and template strings go into code fences.
"""

from __future__ import annotations

import html
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from magpie import __version__
from magpie.errors import MagpieError
from magpie.store import ShardStore, atomic_write_bytes

CARD_NAME = "README.md"
PLOTS_DIR = "plots"
VIEW_NAME = "view.html"
# Everything `magpie card` / `magpie view` (and the end of `magpie run`) write into a dataset dir.
WRITTEN_FILES = (CARD_NAME, PLOTS_DIR, VIEW_NAME)
PLOT_SIZE = (800, 400)  # pixels (width, height) of every PNG
_DPI = 100

# Split name -> file patterns, relative to the dataset dir; the first pattern with files wins.
SPLIT_PATTERNS: dict[str, tuple[str, ...]] = {
    "train": ("part-*.parquet", "train-*.parquet", "train/*.parquet"),
    "validation": ("validation-*.parquet", "validation/*.parquet"),
    "test": ("test-*.parquet", "test/*.parquet"),
}

MAGPIE_CITATION = """@article{xu2024magpie,
  title={Magpie: Alignment Data Synthesis from Scratch by Prompting Aligned LLMs with Nothing},
  author={Zhangchen Xu and Fengqing Jiang and Luyao Niu and Yuntian Deng and Radha Poovendran
          and Yejin Choi and Bill Yuchen Lin},
  journal={ArXiv},
  year={2024},
  volume={abs/2406.08464}
}"""
# Reward models whose papers we can cite (matched on the model id, case-insensitively).
REWARD_CITATIONS = {
    "armorm": """@article{wang2024interpretable,
  title={Interpretable Preferences via Multi-Objective Reward Modeling and Mixture-of-Experts},
  author={Haoxiang Wang and Wei Xiong and Tengyang Xie and Han Zhao and Tong Zhang},
  journal={ArXiv},
  year={2024},
  volume={abs/2406.12845}
}""",
    "fsfairx": """@article{dong2024rlhf,
  title={RLHF Workflow: From Reward Modeling to Online RLHF},
  author={Hanze Dong and Wei Xiong and Bo Pang and Haoxiang Wang and Han Zhao and Yingbo Zhou
          and Nan Jiang and Doyen Sahoo and Caiming Xiong and Tong Zhang},
  journal={ArXiv},
  year={2024},
  volume={abs/2405.07863}
}""",
}


# ---- what the directory holds --------------------------------------------------------------


def split_files(root: Path) -> dict[str, tuple[str, list[Path]]]:
    """Split -> (pattern, files) for the splits present in `root`."""
    found: dict[str, tuple[str, list[Path]]] = {}
    for split, patterns in SPLIT_PATTERNS.items():
        for pattern in patterns:
            files = sorted(p for p in root.glob(pattern) if not p.name.startswith("."))
            if files:
                found[split] = (pattern, files)
                break
    return found


def arrow_schema(files: list[Path]) -> pa.Schema:
    """The schema shared by `files` (widened where shards differ), without file metadata."""
    schema = pa.unify_schemas([pq.read_schema(f) for f in files], promote_options="permissive")
    return schema.remove_metadata()


def features_yaml(schema: pa.Schema) -> list[dict[str, Any]]:
    """`dataset_info.features` as `datasets` itself writes it for `schema`."""
    from datasets import Features

    return Features.from_arrow_schema(schema)._to_yaml_list()


def size_category(rows: int) -> str:
    """The Hub's `size_categories` bucket of a row count."""
    bounds = [
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
        (100_000_000, "10M<n<100M"),
        (1_000_000_000, "100M<n<1B"),
    ]
    return next((label for bound, label in bounds if rows < bound), "n>1T")


@dataclass
class Stage:
    """One dataset in the chain that made the carded one, read from its manifest."""

    path: Path
    manifest: dict[str, Any]

    @property
    def command(self) -> str:
        return str(self.config.get("command") or self.manifest.get("stage") or "?")

    @property
    def config(self) -> dict[str, Any]:
        return self.manifest.get("config") or {}

    @property
    def settings(self) -> dict[str, Any]:
        """The stage's own settings (the config object the command was given)."""
        return self.config.get("config") or {}


def lineage(root: Path, limit: int = 16) -> list[Stage]:
    """The manifests of `root` and of the datasets it was made from, oldest first."""
    chain: list[Stage] = []
    current: Path | None = root
    seen: set[Path] = set()
    while current is not None and len(chain) < limit:
        manifest = ShardStore(current).read_manifest() if current.is_dir() else None
        if manifest is None or current.resolve() in seen:
            break
        seen.add(current.resolve())
        stage = Stage(current, manifest)
        chain.append(stage)
        parent = stage.config.get("input") or stage.config.get("source")
        current = _locate(Path(parent), current) if parent else None
    return chain[::-1]


def _locate(parent: Path, child: Path) -> Path | None:
    """An input path as recorded (relative to where the command ran) or as a sibling of `child`."""
    sibling = child.parent / parent.name
    for candidate in (parent,) if parent.is_absolute() else (sibling, parent):
        if candidate.is_dir():
            return candidate
    return None


def _run_recipe(root: Path) -> str | None:
    """The resolved recipe of the `magpie run` that made `root` (`RUN/pairs`), if any."""
    path = root.parent / "recipe.yaml"
    return path.read_text() if root.name == "pairs" and path.is_file() else None


# ---- markdown helpers ----------------------------------------------------------------------

_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~])")


def md_text(value: Any) -> str:
    """Text safe in a Markdown table cell: HTML-escaped, Markdown punctuation neutralised."""
    text = " ".join(str(value).split())
    return _MD_SPECIAL.sub(r"\\\1", html.escape(text, quote=False))


def md_code(text: str, lang: str = "") -> str:
    """A fenced code block that `text` cannot close."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(md_text(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _num(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


# ---- the card ------------------------------------------------------------------------------


@dataclass
class CardReport:
    """What `write_card` wrote."""

    card: Path
    plots: list[Path] = field(default_factory=list)
    rows: int = 0
    splits: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        split_text = ", ".join(f"{k} {v}" for k, v in self.splits.items()) or "no rows"
        return f"card {self.card} ({split_text}; {len(self.plots)} plots)"


def front_matter(root: Path, base: Path, kind: str, languages: list[str]) -> dict[str, Any]:
    """The YAML header of the card in `base` for the shards in `root` (Hub dataset-card fields)."""
    splits = split_files(root)
    prefix = root.resolve().relative_to(base.resolve()).as_posix()
    prefix = "" if prefix == "." else prefix + "/"
    info: dict[str, Any] = {}
    split_rows: list[dict[str, Any]] = []
    download = 0
    if splits:
        info["features"] = features_yaml(
            arrow_schema([f for _, files in splits.values() for f in files])
        )
    for name, (_, files) in splits.items():
        metas = [pq.read_metadata(f) for f in files]
        nbytes = sum(m.row_group(i).total_byte_size for m in metas for i in range(m.num_row_groups))
        split_rows.append(
            {"name": name, "num_bytes": nbytes, "num_examples": sum(m.num_rows for m in metas)}
        )
        download += sum(f.stat().st_size for f in files)
    if split_rows:
        info["splits"] = split_rows
        info["download_size"] = download
        info["dataset_size"] = sum(s["num_bytes"] for s in split_rows)
    rows = sum(s["num_examples"] for s in split_rows)
    header: dict[str, Any] = {}
    if languages:
        header["language"] = languages
    header |= {
        "size_categories": [size_category(rows)],
        "task_categories": ["text-generation"],
        "tags": ["synthetic", "magpie", "magpie-synth", kind],
        "pretty_name": base.resolve().name,
    }
    if info:
        header["dataset_info"] = info
    data_files = [{"split": s, "path": prefix + p} for s, (p, _) in splits.items()]
    header["configs"] = [
        {
            "config_name": "default",
            "data_files": data_files or [{"split": "train", "path": prefix + "part-*.parquet"}],
        }
    ]
    return header


_LICENSE_NOTE = (
    "# license: set this before publishing. The generator model's license (and that of any\n"
    "# reward/judge model) applies to the generated text, e.g. the Llama 3.1 Community License.\n"
)


def dataset_kind(columns: list[str]) -> str:
    """dpo (chosen/rejected), sft (response or conversations), or instructions."""
    if {"chosen", "rejected"} <= set(columns):
        return "dpo"
    if "response" in columns or "conversations" in columns:
        return "sft"
    return "instructions"


def write_card(root: Path, out: Path | None = None, plots: bool = True) -> CardReport:
    """Write the card of dataset dir `root` to `out` (default `root/README.md`) and its plots."""
    from magpie.stats import dataset_stats

    root = Path(root)
    if not root.is_dir():
        raise MagpieError(f"{root} is not a dataset directory: pass the directory of the shards")
    manifest = ShardStore(root).read_manifest()
    if manifest is not None and not manifest.get("complete"):
        raise MagpieError(f"{root} is incomplete: rerun the command that writes it to finish it")
    splits = split_files(root)
    if not splits and manifest is None:
        raise MagpieError(f"{root} holds no .parquet shards: pass a dataset directory")
    out = Path(out) if out is not None else root / CARD_NAME
    if not root.resolve().is_relative_to(out.parent.resolve()):
        raise MagpieError(
            f"--out {out}: a card must sit in the dataset directory {root} or a folder above it, "
            "so its data_files can name the shards"
        )
    stats = dataset_stats(root) if splits else None
    columns = stats.columns if stats else []
    kind = dataset_kind(columns)
    languages = _languages(stats)
    header = front_matter(root, out.parent, kind, languages)
    report = CardReport(card=out)
    for item in header.get("dataset_info", {}).get("splits", []):
        report.splits[item["name"]] = item["num_examples"]
    report.rows = sum(report.splits.values())
    if plots and stats is not None and stats.rows:
        from magpie.card_plots import draw_plots

        report.plots = draw_plots(root, out.parent / PLOTS_DIR, stats)
    body = _body(root, out, header, stats, kind, report)
    text = "---\n" + _LICENSE_NOTE + yaml.safe_dump(header, sort_keys=False, allow_unicode=True)
    text += "---\n\n" + body
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text.encode())
    return report


def _languages(stats: Any) -> list[str]:
    """Lower-case ISO codes of the `language` tag, most frequent first (at most 20)."""
    if stats is None or "language" not in stats.categorical:
        return []
    codes = [v.value.lower() for v in stats.categorical["language"] if v.value]
    return [c for c in codes if re.fullmatch(r"[a-z]{2,3}", c)][:20]


def _body(
    root: Path, out: Path, header: dict[str, Any], stats: Any, kind: str, report: CardReport
) -> str:
    chain = lineage(root)
    name = header["pretty_name"]
    what = {"dpo": "preference pairs", "sft": "instruction-response rows"}.get(kind, "rows")
    parts = [f"# {md_text(name)}", ""]
    generators = _generators(chain)
    made = f" with {', '.join(md_text(g) for g in generators)}" if generators else ""
    parts.append(
        f"{report.rows:,} synthetic {what} made with the Magpie method{made}, by magpie-synth "
        f"{__version__}. Browse the rows in `{VIEW_NAME}` beside this card (`magpie view` writes "
        "it; it opens offline in any browser)."
    )
    parts += ["", "## Use", "", md_code(_usage(name), "python"), ""]
    if chain:
        parts += ["## How it was made", "", _stages_table(chain), ""]
        parts += _stage_details(chain)
    recipe = _run_recipe(root)
    if recipe:
        parts += ["### The resolved recipe", "", md_code(recipe, "yaml"), ""]
    elif chain:
        config = yaml.safe_dump(chain[-1].config, sort_keys=False, allow_unicode=True)
        parts += ["### The resolved configuration", "", md_code(config, "yaml"), ""]
    if stats is not None and stats.rows:
        parts += _distributions(stats, out, report)
    parts += _license_and_citations(chain)
    return "\n".join(parts).rstrip() + "\n"


def _usage(name: str) -> str:
    return (
        "from datasets import load_dataset\n\n"
        f'ds = load_dataset("path/to/{name}")  # this directory, or its Hub repo id\n'
        'print(ds["train"][0])'
    )


def _generators(chain: list[Stage]) -> list[str]:
    found: list[str] = []
    for stage in chain:
        model = stage.config.get("model_id")
        if model and stage.command in ("instructions", "responses") and model not in found:
            found.append(str(model))
    return found


_SAMPLING_KEYS = {
    "instructions": ("turns", "temperature", "top_p", "max_tokens", "min_chars", "seed"),
    "responses": ("n", "temperature", "top_p", "repetition_penalty", "max_tokens", "seed"),
    "score": ("reward_model", "batch_size", "max_length"),
    "pairs": ("min_margin", "drop_truncated"),
    "tag": ("tags", "neighbor_threshold", "index"),
}


def _stage_settings(stage: Stage) -> str:
    settings = stage.settings
    keys = _SAMPLING_KEYS.get(stage.command, ())
    parts = [f"{k}={settings[k]}" for k in keys if k in settings and settings[k] is not None]
    if stage.command == "filter":
        parts = [f"preset {p}" for p in stage.config.get("presets") or []]
        if stage.config.get("where"):
            parts.append(f"where {stage.config['where']}")
    return ", ".join(str(p) for p in parts)


def _stages_table(chain: list[Stage]) -> str:
    rows = []
    for stage in chain:
        m = stage.manifest
        reasons = m.get("rejections") or {}
        reason_text = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items())) or "-"
        model = stage.config.get("model_id") or stage.config.get("reward_model")
        model = model or stage.config.get("judge") or "-"
        attempts = m.get("attempts") if stage.command == "instructions" else m.get("input_rows")
        rows.append(
            [
                stage.command,
                stage.path.name,
                _num(attempts),
                _num(m.get("rows")),
                reason_text,
                model,
                _stage_settings(stage) or "-",
            ]
        )
    header = ["stage", "dir", "in (attempts)", "rows", "set aside", "model", "settings"]
    return md_table(header, rows)


def _stage_details(chain: list[Stage]) -> list[str]:
    parts: list[str] = []
    for stage in chain:
        fmt = stage.config.get("chat_format") or {}
        if stage.command == "instructions" and fmt:
            system = fmt.get("system_prompt")
            parts += [
                "### Pre-query template",
                "",
                f"Template source: {md_text(fmt.get('source') or '-')}; family: "
                f"{md_text(fmt.get('family') or '-')}; system prompt: "
                + ("none" if system is None else "see below"),
                "",
                md_code(fmt.get("pre_query") or "", "text"),
                "",
                "Exactly, as a JSON string:",
                "",
                md_code(json.dumps(fmt.get("pre_query") or "", ensure_ascii=False), "json"),
                "",
            ]
            if system is not None:
                parts += ["System prompt:", "", md_code(system, "text"), ""]
            stops = fmt.get("stops") or []
            if stops:
                parts += ["Stops:", "", md_code(json.dumps(stops, ensure_ascii=False), "json"), ""]
        if stage.command == "score":
            spec = stage.settings.get("reward_model", "")
            judged = spec == "judge" or str(spec).startswith("judge:")
            how = "an LLM judge (expected 1-10 rating)" if judged else "a reward model"
            parts += [
                f"Rewards: {how}, {md_text(stage.config.get('reward_model') or spec)}.",
                "",
            ]
        if stage.command == "filter" and stage.manifest.get("filter"):
            conditions = stage.manifest["filter"].get("conditions") or []
            rows = [
                [c["name"], c["sql"], c["removed_alone"], c["removed_step"], c["left_after"]]
                for c in conditions
            ]
            parts += [
                f"### Filter ({md_text(stage.path.name)})",
                "",
                md_table(
                    ["condition", "SQL", "removed alone", "removed in turn", "left after"], rows
                ),
                "",
            ]
    return parts


def _distributions(stats: Any, out: Path, report: CardReport) -> list[str]:
    parts = ["## Distributions", ""]
    plot_links = {p.stem: p for p in report.plots}

    def link(key: str, title: str) -> list[str]:
        path = plot_links.get(key)
        if path is None:
            return []
        rel = path.relative_to(out.parent).as_posix()
        return [f"![{title}]({rel})", ""]

    for column, counts in stats.categorical.items():
        rows = [
            ["(null)" if v.value is None else v.value, v.count, f"{v.share:.1%}"]
            for v in counts[:15]
        ]
        rest = counts[15:]
        if rest:
            rows.append([f"({len(rest)} more values)", sum(v.count for v in rest), ""])
        parts += [f"### {column}", "", md_table(["value", "rows", "share"], rows), ""]
        parts += link(column, column)

    def numeric(title: str, summaries: dict[str, Any]) -> list[str]:
        rows = [
            [label, s.count, s.nulls, _num(s.mean), _num(s.p5), _num(s.p50), _num(s.p95)]
            + [_num(s.min), _num(s.max)]
            for label, s in summaries.items()
        ]
        header = ["column", "count", "nulls", "mean", "p5", "p50", "p95", "min", "max"]
        return [f"### {title}", "", md_table(header, rows), ""]

    if stats.lengths:
        parts += numeric("Lengths (characters)", stats.lengths)
        parts += link("lengths", "lengths")
    if stats.scores:
        parts += numeric("Rewards and scores", stats.scores)
        for key in ("rewards", "reward_margin", "instruct_reward", "min_neighbor_distance"):
            parts += link(key, key)
    r = stats.repeats
    if r is not None:
        line = (
            f"Near-duplicates: {r.repeated:,} rows ({r.repeated_share:.1%}) have repeat_count > 0"
        )
        if r.duplicates is not None:
            line += (
                f"; {r.duplicates:,} ({r.duplicates_share:.1%}) are not their group's "
                "representative (`min_similar_uuid` is another row)"
            )
        parts += ["### Near-duplicates", "", line + ".", ""]
    return parts


def _license_and_citations(chain: list[Stage]) -> list[str]:
    parts = [
        "## License",
        "",
        "Not set by magpie-synth: fill in `license` in the header. The text was written by the "
        "generator model(s) named above, so their licenses and use policies apply to it.",
        "",
        "## Citation",
        "",
        "The Magpie method:",
        "",
        md_code(MAGPIE_CITATION, "bibtex"),
        "",
    ]
    reward_ids = " ".join(
        str(s.config.get("reward_model") or s.settings.get("reward_model") or "") for s in chain
    ).lower()
    for key, citation in REWARD_CITATIONS.items():
        if key in reward_ids:
            parts += ["The reward model:", "", md_code(citation, "bibtex"), ""]
    return parts


def read_front_matter(path: Path) -> dict[str, Any]:
    """The YAML header of a card file."""
    text = Path(path).read_text()
    if not text.startswith("---\n"):
        raise MagpieError(f"{path} has no YAML front matter")
    head = text[4:].split("\n---\n", 1)[0]
    return yaml.safe_load(head) or {}
