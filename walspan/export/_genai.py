"""walspan's agent span kinds in the OpenTelemetry GenAI semantic conventions.

The conventions are still "Development", so the names are written out here, in one table
(mirrored in docs/OTEL.md, "GenAI conventions"), rather than imported from a package whose
names may move. Only spans written with walspan's own API are mapped: spans that came from an
OpenTelemetry SDK already carry whatever their instrumentation set.
"""

from __future__ import annotations

from typing import Any

#: walspan kind -> (gen_ai.operation.name, OTLP SpanKind)
OPERATIONS: dict[str, tuple[str, int]] = {
    "generation": ("chat", 3),  # CLIENT: a call to a model
    "llm": ("chat", 3),
    "chat": ("chat", 3),
    "completion": ("text_completion", 3),
    "embedding": ("embeddings", 3),
    "tool": ("execute_tool", 1),  # INTERNAL
    "agent": ("invoke_agent", 1),
    "create_agent": ("create_agent", 1),
}

#: walspan attribute -> GenAI attribute (the walspan name is kept too)
ATTRIBUTES: dict[str, str] = {
    "provider": "gen_ai.provider.name",
    "model": "gen_ai.request.model",
    "response_model": "gen_ai.response.model",
    "input_tokens": "gen_ai.usage.input_tokens",
    "output_tokens": "gen_ai.usage.output_tokens",
    "tool_name": "gen_ai.tool.name",
    "tool_call_id": "gen_ai.tool.call.id",
    "agent_name": "gen_ai.agent.name",
    "temperature": "gen_ai.request.temperature",
    "max_tokens": "gen_ai.request.max_tokens",
    "finish_reason": "gen_ai.response.finish_reasons",
}

CONVERSATION_ID = "gen_ai.conversation.id"
OPERATION_NAME = "gen_ai.operation.name"
TOOL_NAME = "gen_ai.tool.name"
#: Prompts and completions: exported only when the caller opts in (include_io=True).
INPUT_MESSAGES = "gen_ai.input.messages"
OUTPUT_MESSAGES = "gen_ai.output.messages"
TOOL_ARGUMENTS = "gen_ai.tool.call.arguments"
TOOL_RESULT = "gen_ai.tool.call.result"


def native_attributes(span: dict[str, Any], session_id: str, include_io: bool) -> tuple[dict[str, Any], int]:
    """The attributes and OTLP kind of a span written with walspan's API."""
    import json

    attrs = dict(span["attributes"])
    kind = span.get("kind") or "span"
    attrs["walspan.kind"] = kind
    op = OPERATIONS.get(kind)
    if op is None:
        return attrs, 1
    attrs[OPERATION_NAME] = op[0]
    attrs[CONVERSATION_ID] = session_id
    for ours, theirs in ATTRIBUTES.items():
        if ours in attrs and theirs not in attrs:
            value = attrs[ours]
            attrs[theirs] = [value] if theirs.endswith("finish_reasons") and not isinstance(value, list) else value
    if op[0] == "execute_tool" and TOOL_NAME not in attrs:
        attrs[TOOL_NAME] = span["name"]
    if include_io:
        tool = op[0] == "execute_tool"
        for key, value in ((TOOL_ARGUMENTS if tool else INPUT_MESSAGES, span.get("input")),
                           (TOOL_RESULT if tool else OUTPUT_MESSAGES, span.get("output"))):
            if value is not None:
                attrs[key] = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, sort_keys=True)
    return attrs, op[1]
