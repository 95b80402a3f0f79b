"""Reward models that are sequence classifiers (ArmoRM, Skywork-Reward, FsfairX, INF-ORM, ...).

`ClassifierRewardModel` loads a model with transformers' `AutoModelForSequenceClassification`,
formats each [user, assistant] conversation with the reward model's own chat template and returns
one float per conversation. Unlike the original Magpie scripts, which scored one response at a
time, it batches: conversations are sorted by token length, right-padded per batch and scored under
`torch.inference_mode()`; the scores come back in the caller's order and match one-at-a-time
scoring up to float rounding.

torch and transformers are imported lazily, so `short_name` and `reward_column` stay cheap.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
from collections.abc import Callable, Sequence
from difflib import get_close_matches
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

from magpie.errors import MagpieError

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

Conversation = list[dict[str, str]]
"""Chat messages: [{"role": "user", ...}, {"role": "assistant", ...}], maybe a system turn first."""

DTYPES = ("auto", "bfloat16", "float16", "float32")

KNOWN_SHORT_NAMES: dict[str, str] = {
    "armorm-llama3-8b-v0.1": "armorm",
    "skywork-reward-llama-3.1-8b-v0.2": "skywork",
    "fsfairx-llama3-rm-v0.1": "fsfairx",
    "inf-orm-llama3.1-70b": "inf_orm",
}
"""Repository names (lower case) of well-known reward models and their column short names."""

_SEQ_CLS = "AutoModelForSequenceClassification"


class RewardModelError(MagpieError, ValueError):
    """A reward model that cannot be loaded or used. The message is one line, fit for a CLI."""


# --------------------------------------------------------------------------- names


def short_name(model_id: str | os.PathLike[str]) -> str:
    """Snake-case name of a reward model, used in the column `rewards_<short_name>`.

    Well-known models map through `KNOWN_SHORT_NAMES` ("RLHFlow/ArmoRM-Llama3-8B-v0.1" ->
    "armorm"); anything else is its last path component in snake case
    ("Skywork/Skywork-Reward-V2-Llama-3.1-8B" -> "skywork_reward_v2_llama_3_1_8b").
    """
    name = _repo_name(str(model_id))
    known = KNOWN_SHORT_NAMES.get(name.lower())
    if known:
        return known
    return re.sub(r"[^0-9a-z]+", "_", name.lower()).strip("_") or "reward_model"


def reward_column(model_id: str | os.PathLike[str]) -> str:
    """The row column that holds this reward model's scores."""
    return f"rewards_{short_name(model_id)}"


def _repo_name(model_id: str) -> str:
    """Last component of a hub id or path; a hub-cache snapshot path gives its repository name."""
    path = Path(model_id.rstrip("/\\")).expanduser()
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].split("--")[-1]
    return path.name or Path(model_id).expanduser().resolve().name


# --------------------------------------------------------------------------- the model


class ClassifierRewardModel:
    """A sequence-classification reward model that scores chat conversations.

    Args:
        model_id: a local model directory or a Hugging Face hub id (read from the local cache
            when offline).
        dtype: "auto" (the checkpoint's dtype on GPU, float32 on CPU), "bfloat16", "float16" or
            "float32".
        device: "auto" (cuda when available, else cpu) or a torch device string.
        batch_size: conversations per forward pass.
        max_length: inputs longer than this many tokens keep only their first `max_length`
            tokens (also capped at the model's `max_position_embeddings`).
        trust_remote_code: allow running model code shipped with the checkpoint (ArmoRM needs it).
        label_index: which logit is the reward when the model has several labels and its output
            has no `.score`.
        name: override the derived `short_name`.
    """

    def __init__(
        self,
        model_id: str | os.PathLike[str],
        *,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        max_length: int = 4096,
        trust_remote_code: bool = False,
        label_index: int | None = None,
        name: str | None = None,
    ) -> None:
        if batch_size < 1:
            raise RewardModelError(f"batch_size must be >= 1, got {batch_size}")
        if max_length < 1:
            raise RewardModelError(f"max_length must be >= 1, got {max_length}")
        self.model_id = str(model_id)
        self.short_name = name or short_name(self.model_id)
        self.batch_size = batch_size
        self.label_index = label_index
        self.trust_remote_code = bool(trust_remote_code)
        self._warned_pad_collision = False

        source, local = resolve_source(self.model_id)
        config = _read_config_dict(source, local, self.model_id)
        self.custom_code = _needs_custom_code(config)
        if self.custom_code and not self.trust_remote_code:
            raise RewardModelError(
                f"reward model {self.model_id} ships its own model code "
                f"({config['auto_map'].get(_SEQ_CLS, 'auto_map')}); "
                "pass --trust-remote-code (trust_remote_code=True) to allow running it"
            )
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = self._load_tokenizer(source, local)
        self.model = self._load_model(source, local)
        self.pad_token_id = _set_pad_token(self.tokenizer, self.model)
        self.max_length = _cap_max_length(max_length, self.model.config)
        self._check_labels()

    # ----------------------------------------------------------------------- loading

    def _load_tokenizer(self, source: str, local: bool) -> Any:
        from transformers import AutoTokenizer

        tokenizer = load_guarded(
            self.model_id,
            lambda: AutoTokenizer.from_pretrained(
                source, trust_remote_code=self.trust_remote_code, local_files_only=local
            ),
        )
        if not getattr(tokenizer, "chat_template", None):
            raise RewardModelError(
                f"the tokenizer of reward model {self.model_id} has no chat template; "
                "only chat-template reward models are supported"
            )
        return tokenizer

    def _load_model(self, source: str, local: bool) -> Any:
        from transformers import AutoModelForSequenceClassification

        model = load_guarded(
            self.model_id,
            lambda: AutoModelForSequenceClassification.from_pretrained(
                source,
                dtype=self.dtype,
                trust_remote_code=self.trust_remote_code,
                local_files_only=local,
            ),
        )
        return model.to(self.device).eval()

    def _check_labels(self) -> None:
        """Fail at load time, not mid-run, when the reward logit is ambiguous or out of range."""
        num_labels = int(getattr(self.model.config, "num_labels", 1))
        if self.label_index is not None and not 0 <= self.label_index < num_labels:
            raise RewardModelError(
                f"label_index {self.label_index} is out of range for reward model "
                f"{self.model_id} with {num_labels} labels"
            )
        if num_labels > 1 and self.label_index is None and not self.custom_code:
            raise RewardModelError(_many_labels_message(self.model_id, num_labels))

    # ----------------------------------------------------------------------- scoring

    @property
    def column(self) -> str:
        """The row column that holds this model's scores: `rewards_<short_name>`."""
        return f"rewards_{self.short_name}"

    def format(self, conversation: Conversation) -> str:
        """The conversation rendered with the reward model's chat template."""
        text = self.tokenizer.apply_chat_template(list(conversation), tokenize=False)
        if not isinstance(text, str):
            raise RewardModelError(f"chat template of {self.model_id} did not render to a string")
        return text

    def encode(self, conversations: Sequence[Conversation]) -> list[list[int]]:
        """Token ids of each templated conversation, truncated to `max_length`.

        The template already writes the special tokens (BOS, headers), so none are added here.
        """
        texts = [self.format(conversation) for conversation in conversations]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids = [list(seq[: self.max_length]) for seq in encoded]
        truncated = sum(len(seq) > self.max_length for seq in encoded)
        if truncated:
            logger.warning(
                "%d of %d conversations truncated to %d tokens for %s",
                truncated,
                len(ids),
                self.max_length,
                self.model_id,
            )
        if any(not seq for seq in ids):
            raise RewardModelError(f"chat template of {self.model_id} rendered an empty input")
        self._warn_pad_collision(ids)
        return ids

    def score(
        self,
        conversations: Sequence[Conversation],
        progress: Callable[[int], None] | None = None,
    ) -> list[float]:
        """One reward per conversation, in the given order.

        `progress`, when given, is called after each batch with the number of conversations that
        batch scored (an increment, as a progress bar's `advance` takes).
        """
        if not conversations:
            return []
        ids = self.encode(conversations)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
        scores: list[float] = [0.0] * len(ids)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            for index, value in zip(chunk, self._score_batch([ids[i] for i in chunk]), strict=True):
                scores[index] = value
            if progress is not None:
                progress(len(chunk))
        return scores

    def _score_batch(self, sequences: list[list[int]]) -> list[float]:
        import torch

        input_ids, attention_mask = _right_pad(sequences, self.pad_token_id)
        with torch.inference_mode():
            output = self.model(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device)
            )
        values = self._extract(output, len(sequences))
        if not torch.isfinite(values).all():
            logger.warning("reward model %s returned non-finite scores", self.model_id)
        return values.tolist()

    def _extract(self, output: Any, batch: int) -> torch.Tensor:
        """Rewards from a forward output: `.score` (ArmoRM-style custom code), else the logits."""
        score = getattr(output, "score", None)
        if score is None:
            score = output.logits if hasattr(output, "logits") else output[0]
        values = score.float().reshape(batch, -1)
        if values.shape[1] == 1:
            return values[:, 0].cpu()
        if self.label_index is None:
            raise RewardModelError(_many_labels_message(self.model_id, values.shape[1]))
        return values[:, self.label_index].cpu()

    def _warn_pad_collision(self, ids: list[list[int]]) -> None:
        """Warn once when an input ends in the pad token: last-token pooling would skip it."""
        if self._warned_pad_collision or not any(seq[-1] == self.pad_token_id for seq in ids):
            return
        self._warned_pad_collision = True
        logger.warning(
            "inputs of %s end with its pad token (id %d); the model pools the last non-pad "
            "token, so that final token is not scored",
            self.model_id,
            self.pad_token_id,
        )

    def __repr__(self) -> str:
        return (
            f"ClassifierRewardModel({self.model_id!r}, column={self.column!r}, "
            f"device={self.device}, dtype={self.model.dtype}, batch_size={self.batch_size})"
        )


# --------------------------------------------------------------------------- helpers


def _looks_like_path(model_id: str) -> bool:
    """Whether a missing `model_id` was meant as a filesystem path rather than a hub id."""
    return (
        os.path.isabs(model_id)
        or model_id.startswith((".", "~"))
        or "\\" in model_id
        or model_id.count("/") > 1
    )


def resolve_source(model_id: str) -> tuple[str, bool]:
    """(what to pass to from_pretrained, whether it is a local directory)."""
    path = Path(model_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise RewardModelError(f"reward model path is not a directory: {model_id}")
        if not (path / "config.json").is_file():
            raise RewardModelError(f"reward model directory has no config.json: {model_id}")
        if not any(any(path.glob(f"*.{ext}")) for ext in ("safetensors", "bin", "pt", "pth")):
            raise RewardModelError(
                f"reward model directory {model_id} holds no weights (*.safetensors or "
                "pytorch_model.bin): pass the directory the model was saved to"
            )
        return str(path), True
    if _looks_like_path(model_id):
        raise RewardModelError(f"reward model path not found: {model_id}")
    if not _in_hub_cache(model_id) and not hub_reachable():
        raise RewardModelError(
            f"reward model {model_id!r} is not a local path, not in the local hub cache, and the "
            f"hub is not reachable (offline){_suggest(model_id)}"
        )
    return model_id, False


KEYWORDS = ("judge",)
"""Reward-model values that are not models: the LLM judge (`judge`, `judge:MODEL`)."""


def _suggest(value: str) -> str:
    """'; did you mean ...?' for a value near a keyword or a known reward model."""
    names = {k: k for k in KEYWORDS}
    near = get_close_matches(value.lower(), list(names), n=1, cutoff=0.6)
    if near:
        return f"; did you mean {names[near[0]]!r}?"
    return "; pass a local model directory, or a hub id once online"


def _in_hub_cache(model_id: str) -> bool:
    """Whether the hub cache already holds this repository's config.json."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "config.json"), str)
    except Exception:  # an id the hub client rejects is simply not cached
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """False when the hub is switched off (HF_HUB_OFFLINE) or cannot be reached: no retries."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}:
        return False
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return False
    except ImportError:
        pass
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _read_config_dict(source: str, local: bool, model_id: str) -> dict[str, Any]:
    """The raw config.json, read without running any code it references."""
    if local:
        try:
            return json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise RewardModelError(f"cannot read config.json of {model_id}: {exc}") from exc
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(source)
    except (OSError, ValueError) as exc:
        raise RewardModelError(
            f"cannot find reward model {model_id}: not a local directory, and not on the hub or "
            f"in its local cache ({_first_line(exc)})"
        ) from exc
    return config


def _needs_custom_code(config: dict[str, Any]) -> bool:
    """Whether loading as a sequence classifier runs code shipped with the checkpoint.

    A config whose `model_type` transformers knows (ArmoRM says "llama") would otherwise load
    silently as the stock class, with a random head instead of the custom one.
    """
    auto_map = config.get("auto_map") or {}
    if _SEQ_CLS in auto_map:
        return True
    if "AutoConfig" not in auto_map:
        return False
    from transformers import CONFIG_MAPPING

    return config.get("model_type") not in CONFIG_MAPPING


def load_guarded(model_id: str, load: Callable[[], Any]) -> Any:
    """Run a transformers loader, turning its errors into one-line `RewardModelError`s."""
    try:
        return load()
    except RewardModelError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc)
        if "trust_remote_code" in text:
            raise RewardModelError(
                f"reward model {model_id} needs custom code; pass --trust-remote-code "
                "(trust_remote_code=True) to allow running it"
            ) from exc
        raise RewardModelError(f"cannot load reward model {model_id}: {_first_line(exc)}") from exc


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def resolve_device(device: str) -> torch.device:
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise RewardModelError(f"unknown device {device!r}: {_first_line(exc)}") from exc


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype | str:
    """A torch dtype, or "auto" (the checkpoint's own) on GPU; CPU "auto" is float32."""
    import torch

    if dtype not in DTYPES:
        raise RewardModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        return "auto" if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


def _set_pad_token(tokenizer: Any, model: Any) -> int:
    """Give the tokenizer a pad token (the config's, else EOS) and tell the model its id.

    Padding is only ever on the right, and the model finds each input's last token from the pad
    id, so tokenizer and config must agree on it.
    """
    config = model.config
    if tokenizer.pad_token_id is None:
        config_pad = getattr(config, "pad_token_id", None)
        if isinstance(config_pad, int) and 0 <= config_pad < len(tokenizer):
            tokenizer.pad_token = tokenizer.convert_ids_to_tokens(config_pad)
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            raise RewardModelError(
                f"tokenizer of {config.name_or_path} has neither a pad nor an EOS token"
            )
    tokenizer.padding_side = "right"
    pad_id = int(tokenizer.pad_token_id)
    config.pad_token_id = pad_id
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    text_config.pad_token_id = pad_id
    return pad_id


def _cap_max_length(max_length: int, config: Any) -> int:
    limit = getattr(config, "max_position_embeddings", None)
    return min(max_length, limit) if isinstance(limit, int) and limit > 0 else max_length


def _right_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded to the longest sequence."""
    import torch

    width = max(len(seq) for seq in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        input_ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention_mask[row, : len(seq)] = 1
    return input_ids, attention_mask


def _many_labels_message(model_id: str, num_labels: int) -> str:
    return (
        f"reward model {model_id} has {num_labels} output labels and no .score; "
        "pass label_index to choose the logit that is the reward"
    )
