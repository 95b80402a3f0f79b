"""Pre-query template derivation from chat templates written in each family's published format."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from magpie.templates import (
    FAMILIES,
    TASK_PRESETS,
    TemplateDerivationError,
    chat_format_for,
    cross_check,
    derive_chat_format,
    resolve_family,
)

LLAMA3 = (
    "{% for message in messages %}{% set content = '<|start_header_id|>' + message['role'] + "
    "'<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
LLAMA31 = (
    "{{- bos_token }}{%- if not date_string is defined %}{%- set date_string = '26 Jul 2024' %}"
    "{%- endif %}{%- if messages[0]['role'] == 'system' %}"
    "{%- set system_message = messages[0]['content'] | trim %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\n' }}"
    "{{- 'Today Date: ' + date_string + '\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{%- endfor %}{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)


@pytest.fixture(autouse=True)
def _own_render_cache(tmp_path, monkeypatch) -> None:
    """Each test renders its templates for real (the shared cache would answer from disk)."""
    monkeypatch.setattr("magpie.templates.cache_root", lambda: tmp_path / "cache")


def chatml(default_system: str | None) -> str:
    inject = (
        "{%- if loop.first and message['role'] != 'system' %}{{- '<|im_start|>system\\n"
        + default_system
        + "<|im_end|>\\n' }}{%- endif %}"
        if default_system
        else ""
    )
    return (
        "{%- for message in messages %}" + inject + "{{- '<|im_start|>' + message['role'] + "
        "'\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate') }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
PHI3 = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '<|user|>\\n' + message['content'] + '<|end|>\\n<|assistant|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
)
PHI35 = (
    "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}"
    "{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)
MISTRAL = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}"
    "{%- endif %}{{- bos_token }}{%- for message in loop_messages %}"
    "{%- if message['role'] == 'user' %}{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)
VICUNA = (
    "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{% set system = 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' %}"
    "{% set loop_messages = messages %}{% endif %}{{ system + '\\n\\n' }}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{{ 'USER: ' + message['content'] + ' ' }}{% else %}"
    "{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# family name -> (template, bos, eos, system choice that reproduces the Magpie template)
CASES = {
    "llama-3": (LLAMA3, "<|begin_of_text|>", "<|eot_id|>", None),
    "llama-3.1": (LLAMA31, "<|begin_of_text|>", "<|eot_id|>", ""),
    "chatml": (chatml(None), "", "<|im_end|>", None),
    "qwen2": (chatml("You are a helpful assistant."), "", "<|im_end|>", None),
    "qwen2.5": (
        chatml("You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
        "",
        "<|im_end|>",
        None,
    ),
    "smollm2": (
        chatml("You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
        "<|im_start|>",
        "<|im_end|>",
        None,
    ),
    "gemma": (GEMMA, "<bos>", "<eos>", None),
    "phi-3": (PHI3, "<s>", "<|endoftext|>", None),
    "phi-3.5": (PHI35, "", "<|endoftext|>", None),
    "mistral": (MISTRAL, "<s>", "</s>", None),
    "vicuna": (VICUNA, "", "</s>", None),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_derivation_matches_family_table(name: str) -> None:
    template, bos, eos, system = CASES[name]
    derived = derive_chat_format(template, bos_token=bos, eos_token=eos, system_prompt=system)
    family = FAMILIES[name]
    expected = family.chat_format(use_default=True)
    assert derived.pre_query == expected.pre_query
    assert derived.assistant_prefix == family.assistant_prefix
    assert derived.turn_append == family.turn_append
    assert derived.family is not None
    assert FAMILIES[derived.family].user_header == family.user_header
    # every end-of-turn marker the template writes is a stop
    assert set(family.stops) <= set(derived.stops) | {family.user_header.strip()} | {
        "<|endoftext|>",
        "<|end_of_text|>",
        "<|assistant|>",
        "[/INST]",
    }
    assert eos in derived.stops


def test_reference_templates_from_the_published_configs() -> None:
    """The pre-query strings that the original Magpie configs list (shared/REFERENCE.md)."""
    assert resolve_family("llama-3.1").chat_format().pre_query == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert resolve_family("qwen2").chat_format().pre_query == "<|im_start|>user\n"
    assert resolve_family("qwen2").chat_format(use_default=True).pre_query == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    )
    assert resolve_family("smollm").chat_format(use_default=True).pre_query == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
        "Face<|im_end|>\n<|im_start|>user\n"
    )
    vicuna = resolve_family("vicuna").chat_format(use_default=True).pre_query
    assert vicuna.endswith("answers to the user's questions.\n\nUSER: ")


def test_default_system_prompt_is_kept_and_detected() -> None:
    derived = derive_chat_format(chatml("Be brief."), eos_token="<|im_end|>")
    assert derived.pre_query == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n"
    assert derived.system_prompt == "Be brief."


def test_system_prompt_none_strips_the_default() -> None:
    derived = derive_chat_format(chatml("Be brief."), eos_token="<|im_end|>", system_prompt="")
    assert derived.pre_query == "<|im_start|>user\n"
    assert derived.system_prompt is None


def test_llama31_injected_date_block_is_noted() -> None:
    derived = derive_chat_format(LLAMA31, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    assert "Cutting Knowledge Date" in derived.pre_query
    assert "system-prompt none" in (cross_check(derived) or "")


@pytest.mark.parametrize("preset", sorted(TASK_PRESETS))
def test_task_presets_become_the_system_turn(preset: str) -> None:
    fmt = chat_format_for(LLAMA3, bos_token="<|begin_of_text|>", system_prompt=preset)
    assert fmt.pre_query == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
        + TASK_PRESETS[preset]
        + "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert fmt.system_prompt == TASK_PRESETS[preset]


def test_custom_system_text_and_mistral_folding() -> None:
    fmt = chat_format_for(MISTRAL, bos_token="<s>", eos_token="</s>", system_prompt="Be kind.")
    assert fmt.pre_query == "<s>[INST] Be kind.\n\n"


def test_template_without_system_role_refuses_a_system_prompt() -> None:
    with pytest.raises(TemplateDerivationError, match="--system-prompt none"):
        chat_format_for(GEMMA, bos_token="<bos>", system_prompt="math")


def test_missing_chat_template_is_a_clear_error() -> None:
    with pytest.raises(TemplateDerivationError, match="--pre-query-template"):
        chat_format_for(None)


def test_template_that_drops_the_message_is_a_clear_error() -> None:
    with pytest.raises(TemplateDerivationError, match="cannot be located"):
        derive_chat_format("{% for m in messages %}<|im_start|>{{ m.role }}\n{% endfor %}")


def test_broken_template_is_a_clear_error() -> None:
    with pytest.raises(TemplateDerivationError, match="failed to render"):
        derive_chat_format("{{ raise_exception('nope') }}")


def test_family_override_and_literal_override() -> None:
    fmt = chat_format_for(chatml(None), pre_query_template="llama-3")
    assert fmt.pre_query == FAMILIES["llama-3"].chat_format().pre_query
    assert fmt.source == "family:llama-3"
    literal = chat_format_for(chatml(None), pre_query_template="<|im_start|>user\\n")
    assert literal.pre_query == "<|im_start|>user\n"
    assert literal.assistant_prefix == "<|im_end|>\n<|im_start|>assistant\n"
    assert literal.source == "literal"


def test_multi_turn_prompt_assembly() -> None:
    fmt = FAMILIES["llama-3"].chat_format()
    prompt = fmt.query_prompt([("Hi", "Hello!")])
    assert prompt == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n"
    )
    assert fmt.response_prompt([], "Hi").endswith("<|end_header_id|>\n\n")


def test_bundled_model_template(engine) -> None:
    fmt = chat_format_for(
        engine.info.chat_template, bos_token=engine.info.bos_token, eos_token=engine.info.eos_token
    )
    assert fmt.pre_query == FAMILIES["smollm2"].chat_format(use_default=True).pre_query
    assert fmt.family == "smollm2"
    assert "<|im_end|>" in fmt.stops


def test_template_command_prints_the_derived_format(tmp_path) -> None:
    import json

    from conftest import run_cli

    result = run_cli("template", "--system-prompt", "none", "--json")
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["pre_query"] == "<|im_start|>user\n"
    assert shown["turn_append"] == "<|im_end|>\n<|im_start|>user\n"
    assert "<|im_end|>" in shown["stops"] and shown["family"] == "smollm2"
    template = tmp_path / "gemma.jinja"
    template.write_text(GEMMA)
    result = run_cli("template", "--chat-template", str(template), "--system-prompt", "math")
    assert result.returncode == 2
    assert "--system-prompt none" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("template", "--chat-template", str(template))
    assert result.returncode == 0 and "<start_of_turn>user" in result.stdout


# A tool-use template in the style of function-calling ChatML models: it always writes a system
# turn listing the tools and iterates `tools` without checking that it is defined.
TOOL_USE = (
    "{{ bos_token }}<|im_start|>system\nYou may call these functions:\n<tools>"
    "{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_tool_use_template_renders_as_a_chat_without_tools() -> None:
    fmt = derive_chat_format(TOOL_USE, bos_token="<s>", eos_token="<|im_end|>")
    assert fmt.pre_query.endswith("<|im_start|>user\n")
    assert "<tools></tools>" in fmt.pre_query
    assert "<|im_end|>" in fmt.stops


def test_template_failing_on_plain_chat_is_one_line(tmp_path) -> None:
    from conftest import run_cli

    template = tmp_path / "tools.jinja"
    template.write_text("{% for m in messages %}{{ tools[0].name }}{{ m.content }}{% endfor %}")
    result = run_cli("template", "--chat-template", str(template))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0
    assert "failed to render" in result.stderr
    good = tmp_path / "tool_use.jinja"
    good.write_text(TOOL_USE)
    ok = run_cli("template", "--chat-template", str(good), "--json")
    assert ok.returncode == 0, ok.stderr


DERIVE = """
import json, sys
from magpie.templates import derive_chat_format
fmt = derive_chat_format(open(sys.argv[1]).read(), bos_token="<s>", eos_token="</s>")
print(json.dumps({"pre_query": fmt.pre_query, "stops": fmt.stops,
                  "transformers": "transformers" in sys.modules}))
"""


def _derive_in_a_new_process(template: Path, cache: Path) -> dict:
    env = {**os.environ, "MAGPIE_CACHE_DIR": str(cache)}
    out = subprocess.run(
        [sys.executable, "-c", DERIVE, str(template)], env=env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_a_derived_template_is_remembered_and_the_next_command_skips_transformers(
    tmp_path,
) -> None:
    template = tmp_path / "llama31.jinja"
    template.write_text(LLAMA31)
    first = _derive_in_a_new_process(template, tmp_path / "cache")
    assert first["transformers"]  # rendered by transformers' chat template renderer
    assert list((tmp_path / "cache" / "templates").glob("*.txt"))  # one file per render
    again = _derive_in_a_new_process(template, tmp_path / "cache")
    assert not again["transformers"]
    assert again["pre_query"] == first["pre_query"]
    assert again["stops"] == first["stops"]
    assert "Today Date: 26 Jul 2024" in again["pre_query"]


def test_a_remembered_render_keeps_its_line_endings() -> None:
    crlf = chatml(None).replace("\\n", "\\r\\n")
    first = derive_chat_format(crlf, bos_token="<s>", eos_token="<|im_end|>")
    again = derive_chat_format(crlf, bos_token="<s>", eos_token="<|im_end|>")
    assert first.pre_query.endswith("<|im_start|>user\r\n")
    assert again == first


def test_a_template_that_writes_todays_date_is_rendered_each_time(tmp_path) -> None:
    today = LLAMA31.replace("'26 Jul 2024'", "strftime_now('%d %b %Y')")
    fmt = derive_chat_format(today, bos_token="<s>", eos_token="</s>")
    assert fmt.pre_query.startswith("<s><|start_header_id|>system")
    assert not (tmp_path / "cache" / "templates").exists()
