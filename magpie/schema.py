"""Column names and Arrow types of every dataset we write.

The published Magpie datasets are the contract: names and nesting follow them, so their users can
swap our data in. Every stage and export builds its tables from the schemas here.
"""

from __future__ import annotations

import uuid as uuidlib

import pyarrow as pa

# UUID5 namespace of magpie-synth row ids: uuid5(NAMESPACE, instruction text).
ROW_NAMESPACE = uuidlib.UUID("5e1b6f3c-58a4-4c35-9d5f-6d0b8a7e4b21")

GEN_INPUT_CONFIGS = pa.struct(
    [
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("input_generator", pa.string()),
        ("seed", pa.int64()),
        ("pre_query_template", pa.string()),
    ]
)
SHAREGPT_MESSAGE = pa.struct([("from", pa.string()), ("value", pa.string())])
CHAT_MESSAGE = pa.struct([("content", pa.string()), ("role", pa.string())])

INSTRUCTION_FIELDS = [
    pa.field("uuid", pa.string(), nullable=False),
    pa.field("instruction", pa.string(), nullable=False),
    pa.field("gen_input_configs", GEN_INPUT_CONFIGS),
    pa.field("instruction_length", pa.int64()),  # int64 in every stage, as published
    pa.field("instruction_tokens", pa.int64()),
    pa.field("attempt", pa.int64()),
]
CONVERSATIONS_FIELD = pa.field("conversations", pa.list_(SHAREGPT_MESSAGE))

GEN_RESPONSE_CONFIGS = pa.struct(
    [
        ("prompt", pa.string()),
        ("temperature", pa.float64()),
        ("top_p", pa.float64()),
        ("repetition_penalty", pa.float64()),
        ("max_tokens", pa.int64()),
        ("stop_tokens", pa.list_(pa.string())),
        ("output_generator", pa.string()),
        ("engine", pa.string()),
        ("n", pa.int64()),
        ("seed", pa.int64()),
    ]
)
# Columns the responses stage adds (SFT mode also adds `response` and `conversations`).
RESPONSE_COLUMNS: dict[str, pa.DataType] = {
    "responses": pa.list_(pa.string()),
    "response_finish_reasons": pa.list_(pa.string()),
    "response_tokens": pa.list_(pa.int32()),
    "gen_response_configs": GEN_RESPONSE_CONFIGS,
}
REWARD_SCORE = pa.struct([("score", pa.float64())])
# Columns the score stage adds; `rewards_<name>` (e.g. rewards_armorm) is list<REWARD_SCORE>.
REWARD_COLUMNS: dict[str, pa.DataType] = {
    "rewards": pa.list_(pa.float64()),
    "reward_model": pa.string(),
}

# Columns of the tag stage ("unitag"), typed as in the published Magpie datasets.
TAG_COLUMNS: dict[str, pa.DataType] = {
    "intent": pa.string(),
    "knowledge": pa.string(),
    "difficulty": pa.string(),
    "difficulty_generator": pa.string(),
    "input_quality": pa.string(),
    "quality_explanation": pa.string(),
    "quality_generator": pa.string(),
    "task_category": pa.string(),
    "other_task_category": pa.list_(pa.string()),
    "task_category_generator": pa.string(),
    "llama_guard_2": pa.string(),
    "safety": pa.string(),
    "safety_generator": pa.string(),
    "language": pa.string(),
    "instruct_reward": pa.float64(),
    "reward_model": pa.string(),
    "instruct_reward_model": pa.string(),
    "min_neighbor_distance": pa.float64(),
    "repeat_count": pa.int64(),
    "min_similar_uuid": pa.string(),
}

# The published Magpie layouts that `magpie export --format magpie` writes: magpie/published.py.

REJECTED_FIELDS = [
    pa.field("attempt", pa.int64()),
    pa.field("reason", pa.string()),
    pa.field("text", pa.string()),
    pa.field("turn", pa.int32()),
]


def instructions_schema(multi_turn: bool) -> pa.Schema:
    """Schema of an instruction shard; multi-turn rows also carry `conversations`."""
    return pa.schema(INSTRUCTION_FIELDS + ([CONVERSATIONS_FIELD] if multi_turn else []))


REJECTED_SCHEMA = pa.schema(REJECTED_FIELDS)


def row_uuid(text: str) -> str:
    """Deterministic row id of an instruction (or a whole first turn)."""
    return str(uuidlib.uuid5(ROW_NAMESPACE, text))
