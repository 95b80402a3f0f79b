"""Each CLI option that sets a config field has the config's default, so the CLI and a recipe
that leaves the field out make the same dataset (the CLI repeats the defaults for --help)."""

from __future__ import annotations

import inspect

import pytest
from pydantic_core import PydanticUndefined

from magpie import cli, config
from magpie.stages.extend import ExtendConfig

COMMANDS = {
    "instructions": config.InstructionsConfig,
    "responses": config.ResponsesConfig,
    "score": config.ScoreConfig,
    "pairs": config.PairsConfig,
    "tag": config.TagConfig,
    "extend": ExtendConfig,
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_cli_option_defaults_equal_the_config_defaults(command: str) -> None:
    model = COMMANDS[command]
    checked, drifted = 0, []
    for name, parameter in inspect.signature(getattr(cli, command)).parameters.items():
        field = model.model_fields.get(name)
        if field is None or field.default is PydanticUndefined:
            continue  # not a field, or one built from several options (engine, tags)
        checked += 1
        if parameter.default != field.default:
            drifted.append(
                f"--{name.replace('_', '-')}: CLI {parameter.default!r}, config {field.default!r}"
            )
    assert checked >= 2, f"{command}: too few options matched config fields"
    assert not drifted, f"{command}: " + "; ".join(drifted)
