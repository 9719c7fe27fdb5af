"""The HTTP API's request and response bodies (pydantic; FastAPI turns them into /docs).

Requests are strict (`extra="forbid"`): a misspelt field is a 422 that names it, not a silently
ignored option. These are the shapes a client writes; the running application validates against
subclasses that add its own limits and the model's vocabulary (`serve.api.request_models`), so
its `/openapi.json` states them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, model_validator

API_KEY_HEADER = "X-API-Key"
IDEMPOTENCY_HEADER = "Idempotency-Key"
MAX_IDEMPOTENCY_KEY = 128
# Token ids are integers, not booleans or floats that happen to be whole (`true` is refused).
Token = StrictInt
Tokens = list[Token]
# An empty sequence has nothing to read (and no last position to predict from).
Sequence = Annotated[list[Token], Field(min_length=1)]


class Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class TopK(Response):
    """The `k` most likely next tokens, most likely first, with their probabilities."""

    tokens: Tokens
    probs: list[float]


class PositionPrediction(Response):
    """What the model predicts after reading the token at `position`: its `answer` (argmax) and
    the top-k. For a recall task, at a query key's position the answer is the recalled value."""

    position: int
    answer: int
    top: TopK


class PredictRequest(Request):
    """Stateless: each sequence is read from empty memory; nothing is kept afterwards."""

    sequences: list[Sequence] = Field(min_length=1, description="token ids, one list per sequence")
    top_k: int = Field(default=5, ge=1)
    positions: list[list[int]] | None = Field(
        default=None,
        description="per sequence, the positions to report (negative counts from the end, e.g. "
        "a recall task's query positions); default: the last position, i.e. the next token",
    )

    @model_validator(mode="after")
    def _positions_per_sequence(self) -> PredictRequest:
        if self.positions is not None and len(self.positions) != len(self.sequences):
            raise ValueError(
                f"positions has {len(self.positions)} lists for {len(self.sequences)} sequences; "
                "give one list per sequence"
            )
        return self


class SequencePrediction(Response):
    predictions: list[PositionPrediction]


class PredictResponse(Response):
    results: list[SequencePrediction]


class SessionInfo(Response):
    """A session's memory: how much it has read and what its state holds."""

    session_id: str
    tokens_seen: int
    state_bytes: int = Field(description="bytes of the memory state kept for this session")
    live_slots: list[int] = Field(
        description="live memory entries, one count per memory (an encoder-decoder model's "
        "encoded context first, then one per layer)"
    )
    memory: dict[str, float] = Field(description="the mechanism's own state metrics per layer")
    idle_ttl_s: float
    version: int = Field(description="number of updates committed to this session")


class TokensOrText(Request):
    """Give `tokens` or `text` (UTF-8 bytes as tokens, for byte-level models), not both."""

    # "tokens xor text" in the schema too, as the validator below enforces it.
    model_config = ConfigDict(
        json_schema_extra={"oneOf": [{"required": ["tokens"]}, {"required": ["text"]}]}
    )

    tokens: Tokens | None = Field(default=None, min_length=1)
    text: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self) -> TokensOrText:
        if (self.tokens is None) == (self.text is None):
            raise ValueError("give exactly one of 'tokens' or 'text'")
        return self


class AppendRequest(TokensOrText):
    """Tokens (or text) to feed into the session's memory."""

    top_k: int = Field(default=5, ge=1)


class EncodeRequest(TokensOrText):
    """The context to write into an encoder-decoder session's memory."""


class EncodeResponse(Response):
    session_id: str
    context_tokens: int = Field(description="tokens of context the encoder read")
    slots: int = Field(description="memory slots the context was written into")
    state_bytes: int = Field(description="bytes of the session's whole state after encoding")


class AppendResponse(Response):
    session_id: str
    appended: int
    tokens_seen: int
    answers: Tokens = Field(
        description="the model's prediction after each appended token (argmax), in order"
    )
    next: TopK = Field(description="the next token after everything the session has read")
    state_bytes: int


class GenerateRequest(Request):
    """Continue the session. `temperature=0` is greedy; `top_k` limits sampling to the k most
    likely tokens. `advance=false` leaves the session as it was."""

    max_new_tokens: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.0, ge=0.0, le=100.0)
    top_k: int | None = Field(default=None, ge=1)
    seed: int | None = Field(default=None, ge=0, lt=2**63)
    advance: bool = True


class GenerateResponse(Response):
    session_id: str
    tokens: Tokens
    text: str | None = Field(description="the tokens as UTF-8 text, for byte-level models")
    tokens_seen: int


class ModelCard(Response):
    """What is being served: the mechanism, its config, its metrics and where it came from."""

    model_uri: str
    mechanism: str
    task: str
    vocab_size: int
    parameters: int
    state_bytes_per_sequence: int = Field(description="after one task row (row_width tokens)")
    config: dict[str, Any] = Field(description="model, task and training settings it was built by")
    metrics: dict[str, float]
    run_id: str | None
    registered_model: str | None
    version: str | None
    version_tags: dict[str, str]
    text_input: bool = Field(description="whether sessions accept text (byte vocabulary)")


class Health(Response):
    status: str
    model_uri: str
    replica: str = Field(description="the replica that answered")
    sessions: int | None = Field(description="live sessions in the store; None if unreachable")


class ErrorBody(Response):
    detail: Any


class CompletionChoice(Response):
    """One continuation of a text completion."""

    index: int
    text: str
    finish_reason: str = Field(description="stop (a stop string) or length (max_tokens)")
    completion_tokens: int


class CompletionResult(Response):
    """What a model replica returns for a text completion (the OpenAI layer formats it)."""

    prompt_tokens: int
    choices: list[CompletionChoice]
