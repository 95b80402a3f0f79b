"""Chat template -> Magpie pre-query template, multi-turn append template and stop strings.

Magpie prompts an aligned model with only the left part of its chat template, up to where the user's
message would start. We derive that part from the model's own Jinja chat template by rendering
conversations whose messages are unique sentinels and cutting the text around them, so a new model
needs no code change. A small table of known families serves as a cross-check and as an override
(`--pre-query-template llama-3` or a literal string).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from typing import Any

from jinja2 import TemplateError

from magpie.cache import cache_root
from magpie.errors import MagpieError

_USER_1 = "MAGPIEUSERONESENTINEL"
_USER_2 = "MAGPIEUSERTWOSENTINEL"
_ASSISTANT_1 = "MAGPIEASSISTANTONESENTINEL"
_SYSTEM = "MAGPIESYSTEMSENTINEL"
_BOS = "MAGPIEBOSSENTINEL"
_EOS = "MAGPIEEOSSENTINEL"
_DATE = "26 Jul 2024"  # the `date_string` a template sees (Llama 3.1 writes it in its system turn)

# Strings that look like a template's control tokens: <|im_start|>, <start_of_turn>, </s>, [INST]...
_MARKER = re.compile(r"<\|[^|<>\s]{1,40}\|>|<｜[^｜<>]{1,40}｜>|</?[a-z_]{1,24}>|\[/?INST\]")


class TemplateDerivationError(MagpieError):
    """The chat template cannot give a pre-query template; the message says what to do instead."""


@dataclass(frozen=True)
class ChatFormat:
    """The pieces of a chat format that Magpie generation needs.

    A conversation is `pre_query + u1 + assistant_prefix + a1 + turn_append + u2 + ...`.
    """

    pre_query: str
    """Left part of the chat template up to the first user message (with any system turn)."""
    assistant_prefix: str | None
    """After a user message, up to where the assistant's reply starts (the generation prompt)."""
    turn_append: str | None
    """After an assistant reply, up to where the next user message starts (multi-turn)."""
    stops: tuple[str, ...]
    """End-of-turn strings that end a generated message."""
    system_prompt: str | None = None
    """The system text inside `pre_query` (given or injected by default), or None."""
    family: str | None = None
    """The known family whose format this matches, if any."""
    source: str = "chat_template"
    """Where it came from: `chat_template`, `family:<name>` or `literal`."""

    def query_prompt(self, turns: list[tuple[str, str]]) -> str:
        """Prompt that makes the model write the next user message after `turns` (user, reply)."""
        if turns and self.turn_append is None:
            raise TemplateDerivationError(
                "this template has no multi-turn append part: use --turns 1, or give the model's "
                "chat template with --chat-template"
            )
        text = self.pre_query
        for user, reply in turns:
            text += user + self.require_assistant_prefix() + reply + (self.turn_append or "")
        return text

    def response_prompt(self, turns: list[tuple[str, str]], user: str) -> str:
        """Prompt that makes the model reply to `user` after earlier `turns`."""
        return self.query_prompt(turns) + user + self.require_assistant_prefix()

    def require_assistant_prefix(self) -> str:
        if self.assistant_prefix is None:
            raise TemplateDerivationError(
                "this template has no assistant part (a literal pre-query template alone): give "
                "the model's chat template with --chat-template, or a family name"
            )
        return self.assistant_prefix

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Family:
    """A known chat format, as its published chat template renders it."""

    name: str
    bos: str
    system_turn: str | None
    """Format of a system turn, with `{system}`; None when the format has no system role."""
    user_header: str
    assistant_prefix: str
    turn_append: str
    stops: tuple[str, ...]
    default_system: str | None = None

    def chat_format(
        self, system_prompt: str | None = None, use_default: bool = False
    ) -> ChatFormat:
        system = (
            system_prompt
            if system_prompt is not None
            else (self.default_system if use_default else None)
        )
        if system is not None and self.system_turn is None:
            raise TemplateDerivationError(
                f"the {self.name} format has no system turn: use --system-prompt none"
            )
        turn = self.system_turn.format(system=system) if system is not None else ""
        return ChatFormat(
            pre_query=self.bos + turn + self.user_header,
            assistant_prefix=self.assistant_prefix,
            turn_append=self.turn_append,
            stops=self.stops,
            system_prompt=system,
            family=self.name,
            source=f"family:{self.name}",
        )


_LLAMA3_STOPS = ("<|eot_id|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>")
_CHATML_STOPS = ("<|im_end|>", "<|im_start|>", "<|endoftext|>")
_LLAMA3 = Family(
    name="llama-3",
    bos="<|begin_of_text|>",
    system_turn="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
    user_header="<|start_header_id|>user<|end_header_id|>\n\n",
    assistant_prefix="<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    turn_append="<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n",
    stops=_LLAMA3_STOPS,
)
_CHATML = Family(
    name="chatml",
    bos="",
    system_turn="<|im_start|>system\n{system}<|im_end|>\n",
    user_header="<|im_start|>user\n",
    assistant_prefix="<|im_end|>\n<|im_start|>assistant\n",
    turn_append="<|im_end|>\n<|im_start|>user\n",
    stops=_CHATML_STOPS,
)
_GEMMA = Family(
    name="gemma",
    bos="<bos>",
    system_turn=None,
    user_header="<start_of_turn>user\n",
    assistant_prefix="<end_of_turn>\n<start_of_turn>model\n",
    turn_append="<end_of_turn>\n<start_of_turn>user\n",
    stops=("<end_of_turn>", "<start_of_turn>", "<eos>"),
)
_PHI3 = Family(
    name="phi-3",
    bos="<s>",
    system_turn="<|system|>\n{system}<|end|>\n",
    user_header="<|user|>\n",
    assistant_prefix="<|end|>\n<|assistant|>\n",
    turn_append="<|end|>\n<|user|>\n",
    stops=("<|end|>", "<|endoftext|>", "<|user|>", "<|assistant|>"),
)
_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives "
    "helpful, detailed, and polite answers to the user's questions."
)

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        _LLAMA3,
        replace(_LLAMA3, name="llama-3.1"),
        replace(_LLAMA3, name="llama-3.2"),
        replace(_LLAMA3, name="llama-3.3"),
        _CHATML,
        replace(_CHATML, name="qwen2", default_system="You are a helpful assistant."),
        replace(
            _CHATML,
            name="qwen2.5",
            default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant.",
        ),
        replace(
            _CHATML,
            name="smollm2",
            stops=("<|im_end|>", "<|im_start|>", "<|endoftext|>"),
            default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
        ),
        _GEMMA,
        replace(_GEMMA, name="gemma-2"),
        _PHI3,
        replace(_PHI3, name="phi-3.5", bos=""),
        Family(
            name="mistral",
            bos="<s>",
            system_turn=None,
            user_header="[INST] ",
            assistant_prefix="[/INST]",
            turn_append="</s>[INST] ",
            stops=("</s>", "[INST]", "[/INST]"),
        ),
        Family(
            name="vicuna",
            bos="",
            system_turn="{system}\n\n",
            user_header="USER: ",
            assistant_prefix=" ASSISTANT:",
            turn_append="</s>USER: ",
            stops=("</s>", "USER:"),
            default_system=_VICUNA_SYSTEM,
        ),
    ]
}
FAMILY_ALIASES = {"llama3": "llama-3", "qwen": "qwen2.5", "smollm": "smollm2", "phi3": "phi-3"}

# Task presets: a system turn that steers what kind of instruction the model writes.
TASK_PRESETS: dict[str, str] = {
    "math": (
        "You are an AI assistant that specialises in mathematics. Users bring you problems from "
        "arithmetic to calculus, statistics and proofs, and you walk them through each step of "
        "the solution."
    ),
    "code": (
        "You are an AI assistant for programmers. Users ask you to write, explain, review and "
        "debug code in many languages, and you answer with working code and clear reasoning."
    ),
    "translation": (
        "You are an AI assistant that translates text. Users give you passages in one language "
        "and ask for faithful, natural translations into another."
    ),
    "reasoning": (
        "You are an AI assistant that solves logic puzzles and reasoning problems. Users give you "
        "riddles, deductions and multi-step questions, and you reason them out carefully."
    ),
    "creative": (
        "You are an AI assistant for creative writing. Users ask you for stories, poems, "
        "dialogue and ideas, and you write with imagination and care."
    ),
}
NO_SYSTEM = "none"


def resolve_family(name: str) -> Family | None:
    """The known family called `name` (case-insensitive, aliases accepted), or None."""
    key = name.strip().lower()
    return FAMILIES.get(FAMILY_ALIASES.get(key, key))


def resolve_system_prompt(value: str | None) -> str | None:
    """Map `--system-prompt` to text: a preset name gives its text, `none` gives ""."""
    if value is None:
        return None
    if value.strip().lower() == NO_SYSTEM:
        return ""
    return TASK_PRESETS.get(value.strip().lower(), value)


def _render(template: str, messages: list[dict[str, str]], generation: bool) -> str:
    """Render `messages` with transformers' chat template renderer, remembered on disk.

    The text is a function of the template, the sentinel messages and the transformers and
    jinja2 releases, so it is kept under the cache directory by their hash: a later command
    derives its format without importing transformers (about 1.4 s of every command's start on
    2 cores). A template that writes today's date (`strftime_now`) is rendered afresh each
    time."""
    if "strftime_now" in template:
        return _render_now(template, messages, generation)
    key = _render_key(template, messages, generation)
    path = cache_root() / "templates" / f"{key}.txt"
    with contextlib.suppress(OSError, UnicodeDecodeError):
        return path.read_bytes().decode("utf-8")  # bytes: a "\r\n" stays as rendered
    text = _render_now(template, messages, generation)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.{os.getpid()}")
        temp.write_bytes(text.encode("utf-8"))
        temp.replace(path)
    return text


def _render_key(template: str, messages: list[dict[str, str]], generation: bool) -> str:
    releases = []
    for package in ("transformers", "jinja2"):
        try:
            releases.append(metadata.version(package))
        except metadata.PackageNotFoundError:
            releases.append("none")
    blob = json.dumps([template, messages, generation, _BOS, _EOS, _DATE, releases])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _render_now(template: str, messages: list[dict[str, str]], generation: bool) -> str:
    """Render `messages`; a tool-use template that needs a tool list gets an empty one."""
    from transformers.utils.chat_template_utils import render_jinja_template

    def render(tools: list[dict[str, Any]] | None) -> str:
        rendered, _ = render_jinja_template(
            conversations=[messages],
            chat_template=template,
            tools=tools,
            add_generation_prompt=generation,
            bos_token=_BOS,
            eos_token=_EOS,
            date_string=_DATE,
        )
        return rendered[0]

    try:
        return render(None)
    except TypeError:  # e.g. `for tool in tools` with tools undefined
        return render([])


def _between(text: str, start: str, end: str) -> str:
    i = text.index(start) + len(start)
    return text[i : text.index(end, i)]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def markers(text: str) -> list[str]:
    """Control-token-like strings in `text`, in order."""
    return _MARKER.findall(text)


def _stops(end_of_turn: str, user_header: str, eos: str) -> tuple[str, ...]:
    found = markers(end_of_turn) + ([eos] if eos else []) + markers(user_header)
    if not markers(user_header) and user_header.strip():
        found.append(user_header.strip())
    if not found and end_of_turn.strip():
        found.append(end_of_turn.strip())
    return tuple(dict.fromkeys(found))


def derive_chat_format(
    chat_template: str,
    *,
    bos_token: str = "",
    eos_token: str = "",
    system_prompt: str | None = None,
) -> ChatFormat:
    """Derive the Magpie chat format from a Jinja chat template.

    `system_prompt`: None keeps whatever system turn the template injects by default, "" strips
    it, any other text becomes the system turn.
    """
    try:
        return _derive(chat_template, bos_token, eos_token, system_prompt)
    except TemplateError as exc:
        raise TemplateDerivationError(
            f"the chat template failed to render ({exc}): pass --pre-query-template with a family "
            "name or a literal string"
        ) from exc
    except ValueError as exc:  # str.index: a sentinel is missing from the rendered text
        raise TemplateDerivationError(
            "the chat template drops or rewrites message text, so the user message cannot be "
            "located: pass --pre-query-template with a family name or a literal string"
        ) from exc
    except (TypeError, KeyError, AttributeError, IndexError) as exc:
        raise TemplateDerivationError(
            f"the chat template failed to render a plain chat ({type(exc).__name__}: {exc}): "
            "pass --pre-query-template with a family name or a literal string"
        ) from exc


def _derive(template: str, bos: str, eos: str, system_prompt: str | None) -> ChatFormat:
    def real(text: str) -> str:
        return text.replace(_BOS, bos).replace(_EOS, eos)

    one = _render(template, [{"role": "user", "content": _USER_1}], generation=True)
    default_pre = one[: one.index(_USER_1)]
    assistant_prefix = one[one.index(_USER_1) + len(_USER_1) :]
    history = [
        {"role": "user", "content": _USER_1},
        {"role": "assistant", "content": _ASSISTANT_1},
    ]
    closed = _render(template, history, generation=False)
    end_of_turn = closed[closed.index(_ASSISTANT_1) + len(_ASSISTANT_1) :]
    two = _render(template, [*history, {"role": "user", "content": _USER_2}], generation=True)
    turn_append = _between(two, _ASSISTANT_1, _USER_2)
    user_header = turn_append[_common_prefix(end_of_turn, turn_append) :]
    bare_pre = (_BOS if default_pre.startswith(_BOS) else "") + user_header

    with_system = _system_pre(template, _SYSTEM)
    default_system = None
    if default_pre != bare_pre and with_system is not None:
        head, tail = with_system.split(_SYSTEM, 1)
        if default_pre.startswith(head) and default_pre.endswith(tail):
            default_system = default_pre[len(head) : len(default_pre) - len(tail)]

    if system_prompt is None:
        pre, system = default_pre, default_system
    elif system_prompt == "":
        pre, system = bare_pre, None
    else:
        rendered = _system_pre(template, system_prompt)
        if rendered is None:
            raise TemplateDerivationError(
                "this chat template has no system turn: use --system-prompt none"
            )
        pre, system = rendered, system_prompt
    fmt = ChatFormat(
        pre_query=real(pre),
        assistant_prefix=real(assistant_prefix),
        turn_append=real(turn_append),
        stops=_stops(real(end_of_turn), real(user_header), eos),
        system_prompt=system,
    )
    return _with_family(fmt, real(bare_pre), default_system)


def _system_pre(template: str, system: str) -> str | None:
    """Pre-query part with a system turn, or None when the template refuses system turns."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": _USER_1}]
    try:
        rendered = _render(template, messages, generation=True)
    except TemplateError:
        return None
    pre = rendered[: rendered.index(_USER_1)]
    return pre if system in pre else None


def match_family(fmt: ChatFormat, bare_pre: str, default_system: str | None) -> str | None:
    """Name of the known family with this system-free format (and default system), or None."""
    matches = [
        f
        for f in FAMILIES.values()
        if (f.bos + f.user_header, f.assistant_prefix, f.turn_append)
        == (bare_pre, fmt.assistant_prefix, fmt.turn_append)
    ]
    for family in matches:
        if family.default_system == default_system:
            return family.name
    return matches[0].name if matches else None


def _with_family(fmt: ChatFormat, bare_pre: str, default_system: str | None) -> ChatFormat:
    """Tag `fmt` with its known family and add the family's stop strings."""
    name = match_family(fmt, bare_pre, default_system)
    if name is None:
        return fmt
    stops = tuple(dict.fromkeys(fmt.stops + FAMILIES[name].stops))
    return replace(fmt, family=name, stops=stops)


def literal_format(pre_query: str, base: ChatFormat | None) -> ChatFormat:
    """A user-given pre-query string; the other pieces come from `base` (the model's) if known."""
    text = pre_query.encode().decode("unicode_escape") if "\\n" in pre_query else pre_query
    if base is None:
        return ChatFormat(text, None, None, tuple(markers(text)[-1:]), source="literal")
    return replace(base, pre_query=text, system_prompt=None, source="literal")


def cross_check(derived: ChatFormat) -> str | None:
    """A note where the derived format departs from the Magpie template of its family, else None."""
    if derived.family is None:
        return None
    family = FAMILIES[derived.family]
    if derived.system_prompt is not None and family.default_system is None:
        return (
            f"the chat template injects a system turn that the Magpie {family.name} template has "
            "not; pass --system-prompt none to match it"
        )
    return None


def chat_format_for(
    chat_template: str | None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    pre_query_template: str | None = None,
    system_prompt: str | None = None,
) -> ChatFormat:
    """The chat format to use: derived from `chat_template`, or a family / literal override.

    `system_prompt` is the raw `--system-prompt` value (text, preset name, `none`, or None).
    """
    system = resolve_system_prompt(system_prompt)
    derived = None
    if chat_template:
        derived = derive_chat_format(
            chat_template, bos_token=bos_token, eos_token=eos_token, system_prompt=system
        )
    if pre_query_template is None:
        if derived is None:
            raise TemplateDerivationError(
                "the model has no chat template: pass --pre-query-template with a family name "
                f"({', '.join(FAMILIES)}) or --chat-template FILE.jinja"
            )
        return derived
    family = resolve_family(pre_query_template)
    if family is not None:
        return family.chat_format(system or None, use_default=system is None)
    if system_prompt is not None:
        raise TemplateDerivationError(
            "--system-prompt cannot change a literal --pre-query-template: write the system turn "
            "into the literal, or pass a family name"
        )
    return literal_format(pre_query_template, derived)
