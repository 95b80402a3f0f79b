"""N responses per instruction, sampled with the model's chat template.

Pure stage: a table of instructions in, the same rows with `responses` (n strings, order kept),
their finish reasons and token counts, and `gen_response_configs` out. With n == 1 the rows also
get Magpie's SFT shape: `response`, `response_length` (characters) and a ShareGPT
`conversations` list.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa

from magpie.config import ResponsesConfig
from magpie.engines.base import Engine, Request, Sampling, batch_invariant
from magpie.schema import RESPONSE_COLUMNS, SHAREGPT_MESSAGE
from magpie.stages.base import Progress, TransformOutput, dialogue
from magpie.templates import ChatFormat

INSTRUCTION_PLACEHOLDER = "{instruction}"


def row_seed(run_seed: int, uuid: str) -> int:
    """Deterministic 31-bit seed of a row's samples (sample i uses seed + i)."""
    digest = hashlib.sha256(f"{run_seed}:{uuid}:response".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x3FFFFFFF


class ResponseStage:
    """Samples `config.n` responses per row in one request (the engine shares the prompt)."""

    name = "responses"
    required_columns = ("instruction", "uuid")

    def __init__(
        self, engine: Engine, chat_format: ChatFormat, config: ResponsesConfig, model_id: str
    ) -> None:
        self.engine = engine
        self.format = chat_format
        self.config = config
        self.sampling = Sampling(
            temperature=config.temperature,
            top_p=config.top_p,
            max_tokens=config.max_tokens,
            repetition_penalty=config.repetition_penalty,
            stop=chat_format.stops,
        )
        self.gen_config = {
            "prompt": chat_format.response_prompt([], INSTRUCTION_PLACEHOLDER),
            "temperature": config.temperature,
            "top_p": config.top_p,
            "repetition_penalty": config.repetition_penalty,
            "max_tokens": config.max_tokens,
            "stop_tokens": list(chat_format.stops),
            "output_generator": model_id,
            "engine": config.engine.name,
            "n": config.n,
            "seed": config.seed,
        }

    def __call__(self, table: pa.Table, progress: Progress) -> TransformOutput:
        rows = table.to_pylist()
        requests = []
        for row in rows:
            history, user = dialogue(row)
            requests.append(
                Request(
                    prompt=self.format.response_prompt(history, user),
                    sampling=self.sampling,
                    n=self.config.n,
                    seed=row_seed(self.config.seed, row["uuid"]),
                )
            )
        results = self.engine.generate(requests, progress.on_done)
        columns: dict[str, list] = {name: [] for name in RESPONSE_COLUMNS}
        for completions in results:
            columns["responses"].append([c.text.strip() for c in completions])
            columns["response_finish_reasons"].append([c.finish_reason for c in completions])
            columns["response_tokens"].append([c.completion_tokens for c in completions])
            columns["gen_response_configs"].append(self.gen_config)
        out = table
        for name, values in columns.items():
            out = _set_column(out, name, pa.array(values, type=RESPONSE_COLUMNS[name]))
        if self.config.n == 1:
            out = _with_sft_shape(out, rows, columns["responses"])
        return self.account(out)

    @property
    def poolable(self) -> bool:
        """Whether several shards may be sampled in one engine call (see `batch_invariant`)."""
        return batch_invariant(self.engine)

    def account(self, rows: pa.Table) -> TransformOutput:
        """The output of these rows with its bookkeeping: tokens and truncated responses."""
        tokens = sum(sum(t) for t in rows.column("response_tokens").to_pylist())
        reasons = rows.column("response_finish_reasons").to_pylist()
        truncated = sum(r.count("length") for r in reasons)
        return TransformOutput(rows=rows, tokens=tokens, rejections={"truncated_kept": truncated})


def _set_column(table: pa.Table, name: str, values: pa.Array) -> pa.Table:
    if name in table.column_names:
        return table.set_column(table.column_names.index(name), name, values)
    return table.append_column(name, values)


def _with_sft_shape(table: pa.Table, rows: list[dict], responses: list[list[str]]) -> pa.Table:
    conversations = []
    for row, (response,) in zip(rows, responses, strict=True):
        history, user = dialogue(row)
        turns = [
            message
            for u, r in [*history, (user, response)]
            for message in ({"from": "human", "value": u}, {"from": "gpt", "value": r})
        ]
        conversations.append(turns)
    table = _set_column(table, "response", pa.array([r[0] for r in responses], pa.string()))
    lengths = pa.array([len(r[0]) for r in responses], pa.int64())  # characters, as published
    table = _set_column(table, "response_length", lengths)
    return _set_column(
        table, "conversations", pa.array(conversations, type=pa.list_(SHAREGPT_MESSAGE))
    )
