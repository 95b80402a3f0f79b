"""The column layouts of the published Magpie datasets, as `magpie export --format magpie` writes.

Names, order and Arrow types follow the datasets' own `dataset_info` (read from their cards):

- `MAGPIE_SFT_LAYOUT`: the Llama-3.1 Pro SFT sets (Magpie-Llama-3.1-Pro-1M / -300K-Filtered).
  Their `gen_input_configs.seed` is typed `null` there (they recorded no seed); ours carries the
  run's seed, so it stays `int64`.
- `MAGPIE_DPO_LAYOUT`: the DPO sets (Magpie-Pro-DPO-100K-v0.1, Magpie-Llama-3.1-Pro-DPO-100K),
  whose structs list their fields alphabetically.

`input_length` (DPO) is filled with the instruction's length in characters, the measure our
`instruction_length` and the SFT sets' `instruction_length` use.
"""

from __future__ import annotations

import pyarrow as pa

from magpie.schema import CHAT_MESSAGE, GEN_INPUT_CONFIGS, REWARD_SCORE, SHAREGPT_MESSAGE

_TEXT = pa.string()
_FLOAT = pa.float64()
_INT = pa.int64()

MAGPIE_SFT_LAYOUT: dict[str, pa.DataType] = {
    "uuid": _TEXT,
    "model": _TEXT,
    "gen_input_configs": GEN_INPUT_CONFIGS,
    "instruction": _TEXT,
    "response": _TEXT,
    "conversations": pa.list_(SHAREGPT_MESSAGE),
    "task_category": _TEXT,
    "other_task_category": pa.list_(_TEXT),
    "task_category_generator": _TEXT,
    "difficulty": _TEXT,
    "intent": _TEXT,
    "knowledge": _TEXT,
    "difficulty_generator": _TEXT,
    "input_quality": _TEXT,
    "quality_explanation": _TEXT,
    "quality_generator": _TEXT,
    "llama_guard_2": _TEXT,
    "reward_model": _TEXT,
    "instruct_reward": _FLOAT,
    "min_neighbor_distance": _FLOAT,
    "repeat_count": _INT,
    "min_similar_uuid": _TEXT,
    "instruction_length": _INT,
    "response_length": _INT,
    "language": _TEXT,
}

DPO_GEN_INPUT_CONFIGS = pa.struct(
    [("input_generator", _TEXT), ("temperature", _FLOAT), ("top_p", _FLOAT)]
)
DPO_GEN_RESPONSE_CONFIGS = pa.struct(
    [
        ("engine", _TEXT),
        ("max_tokens", _INT),
        ("output_generator", _TEXT),
        ("prompt", _TEXT),
        ("repetition_penalty", _FLOAT),
        ("stop_tokens", pa.list_(_TEXT)),
        ("temperature", _FLOAT),
        ("top_p", _FLOAT),
    ]
)
MAGPIE_DPO_LAYOUT: dict[str, pa.DataType] = {
    "uuid": _TEXT,
    "instruction": _TEXT,
    "gen_input_configs": DPO_GEN_INPUT_CONFIGS,
    "intent": _TEXT,
    "knowledge": _TEXT,
    "difficulty": _TEXT,
    "input_quality": _TEXT,
    "quality_explanation": _TEXT,
    "task_category": _TEXT,
    "input_length": _INT,
    "responses": pa.list_(_TEXT),
    "gen_response_configs": DPO_GEN_RESPONSE_CONFIGS,
    "rewards_armorm": pa.list_(REWARD_SCORE),
    "chosen": pa.list_(CHAT_MESSAGE),
    "rejected": pa.list_(CHAT_MESSAGE),
}
