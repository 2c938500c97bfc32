"""Detect a dataset's shape and normalize each row into a Conversation.

Shapes: chat `messages` (TRL conversational, Multilingual-Thinking, OpenAI tool calls with a `tools`
column), the top-level Multilingual-Thinking columns, ShareGPT `conversations`, Alpaca and
prompt/completion. Every problem raises a DataError naming the file, row and field.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from gptoss_tune.data.conversation import ROLES, Conversation, Message, ToolCall
from gptoss_tune.data.load import SourceRow
from gptoss_tune.errors import DataError

FORMATS = ("auto", "messages", "mt-columns", "sharegpt", "alpaca", "prompt-completion")
FORMAT_HELP = (
    "messages: {messages: [{role, content, thinking?, tool_calls?}], tools?}; "
    "mt-columns: Multilingual-Thinking's developer/user/analysis/final columns; "
    "sharegpt: {conversations: [{from, value}]}; alpaca: instruction/input/output (+system); "
    "prompt-completion: prompt/completion as strings or message lists"
)
THINKING_KEYS = ("thinking", "reasoning_content", "reasoning")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "model": "assistant",
    "system": "system",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}


def detect_format(row: SourceRow) -> str:
    data = row.data or {}
    keys = set(data)
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "completion"} <= keys:
        return "prompt-completion"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"user", "final"} <= keys:
        return "mt-columns"
    columns = ", ".join(sorted(keys)) or "none"
    raise DataError(
        f"unknown dataset shape (columns: {columns}). Accepted shapes: {FORMAT_HELP}. "
        "Rename the columns or force one with --format.",
        file=row.file,
        row=row.row,
        reason="unknown_shape",
    )


def normalize(row: SourceRow, fmt: str, index: int) -> Conversation:
    """One row in the given shape -> Conversation (raises DataError)."""
    ctx = _Row(row)
    context = 0  # leading raw messages that are context only
    if fmt == "messages":
        raw_messages = ctx.list_field(row.data, "messages")
        tools = _tools(ctx, row.data.get("tools"))
    elif fmt == "sharegpt":
        raw_messages, tools = _sharegpt_messages(ctx), _tools(ctx, row.data.get("tools"))
    elif fmt == "alpaca":
        raw_messages, tools = _alpaca_messages(ctx), ()
    elif fmt == "prompt-completion":
        (raw_messages, context), tools = _prompt_completion_messages(ctx), _tools(ctx, row.data.get("tools"))
    elif fmt == "mt-columns":
        raw_messages, tools = _mt_column_messages(ctx), ()
    else:
        raise DataError(f"unknown format '{fmt}'; use one of {', '.join(FORMATS)}", reason="unknown_shape")
    return _conversation(ctx, raw_messages, tools, index, context)


@dataclass
class _Row:
    """Where we are, for error messages."""

    row: SourceRow
    calls: dict[str, str] = field(default_factory=dict)  # tool_call_id -> function name

    def error(self, message: str, field_name: str | None, reason: str) -> DataError:
        return DataError(message, file=self.row.file, row=self.row.row, field=field_name, reason=reason)

    def list_field(self, data: dict, name: str, path: str | None = None) -> list:
        path = path or name
        if name not in data or data[name] is None:
            raise self.error("missing", path, "missing_field")
        value = _maybe_json(data[name])
        if not isinstance(value, list):
            raise self.error(f"expected a list, found {type(value).__name__}", path, "invalid_field")
        return value

    def string_field(self, data: dict, name: str, path: str, optional: bool = False) -> str | None:
        value = data.get(name)
        if value is None:
            if optional:
                return None
            reason = "missing_content" if name in ("content", "value") else "missing_field"
            raise self.error("missing (expected a string)", path, reason)
        if not isinstance(value, str):
            reason = "invalid_content" if name in ("content", "value") else "invalid_field"
            raise self.error(f"expected a string, found {type(value).__name__}", path, reason)
        return value


def _maybe_json(value: Any) -> Any:
    """CSV cells and some exports hold lists as JSON text."""
    if isinstance(value, str) and value.lstrip().startswith(("[", "{")):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


# --- shapes -> raw message dicts (role, content, thinking, tool_calls, tool_call_id, name) -----------


def _sharegpt_messages(ctx: _Row) -> list[dict]:
    data = ctx.row.data
    turns = ctx.list_field(data, "conversations")
    out: list[dict] = []
    if isinstance(data.get("system"), str) and data["system"]:
        out.append({"role": "system", "content": data["system"]})
    for i, turn in enumerate(turns):
        path = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise ctx.error("expected an object with 'from' and 'value'", path, "invalid_field")
        speaker = ctx.string_field(turn, "from", f"{path}.from")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise ctx.error(
                f"unknown speaker '{speaker}' (use one of {', '.join(SHAREGPT_ROLES)})",
                f"{path}.from",
                "unknown_role",
            )
        value = ctx.string_field(turn, "value", f"{path}.value")
        message = {"role": role, "content": value, "_path": path}
        for key in THINKING_KEYS:
            if key in turn:
                message[key] = turn[key]
        if speaker.lower() == "function_call":
            call = _maybe_json(value)
            if not isinstance(call, dict) or "name" not in call:
                raise ctx.error(
                    'a function_call value must be JSON {"name", "arguments"}',
                    f"{path}.value",
                    "invalid_tool_call",
                )
            message.update(content="", tool_calls=[call])
        out.append(message)
    return out


def _alpaca_messages(ctx: _Row) -> list[dict]:
    data = ctx.row.data
    instruction = ctx.string_field(data, "instruction", "instruction")
    extra = ctx.string_field(data, "input", "input", optional=True)
    output = ctx.string_field(data, "output", "output")
    system = ctx.string_field(data, "system", "system", optional=True)
    prompt = f"{instruction}\n\n{extra}" if extra else instruction
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [
        {"role": "user", "content": prompt, "_path": "instruction"},
        {"role": "assistant", "content": output, "_path": "output"},
    ]


def _maybe_message_list(value: Any) -> Any:
    """A prompt or completion is text, or a list of messages (given as JSON text in CSV cells). Text
    that merely looks like JSON, such as a structured-output completion, stays text."""
    parsed = _maybe_json(value)
    if isinstance(parsed, list) and parsed and all(isinstance(m, dict) and "role" in m for m in parsed):
        return parsed
    return value


def _prompt_completion_messages(ctx: _Row) -> tuple[list[dict], int]:
    """The row's messages, and how many of them are the prompt (context only: as in TRL, a
    prompt-completion row trains its completion, never an example answer inside its prompt)."""
    data = ctx.row.data
    out: list[dict] = []
    prompt_length = 0
    for name, role in (("prompt", "user"), ("completion", "assistant")):
        prompt_length = len(out)
        value = _maybe_message_list(data.get(name))
        if isinstance(value, str):
            out.append({"role": role, "content": value, "_path": name})
        elif isinstance(value, list):
            out.extend(
                {**m, "_path": f"{name}[{i}]"} if isinstance(m, dict) else m for i, m in enumerate(value)
            )
        elif value is None:
            raise ctx.error("missing (expected a string or a list of messages)", name, "missing_field")
        else:
            raise ctx.error(
                f"expected a string or a list of messages, found {type(value).__name__}",
                name,
                "invalid_field",
            )
    return out, prompt_length


def _mt_column_messages(ctx: _Row) -> list[dict]:
    data = ctx.row.data
    developer = ctx.string_field(data, "developer", "developer", optional=True)
    language = ctx.string_field(data, "reasoning_language", "reasoning_language", optional=True)
    if language:  # as in the dataset's own `messages` column
        developer = (
            f"reasoning language: {language}\n\n{developer}"
            if developer
            else f"reasoning language: {language}"
        )
    messages = [{"role": "system", "content": developer}] if developer else []
    return messages + [
        {"role": "user", "content": ctx.string_field(data, "user", "user"), "_path": "user"},
        {
            "role": "assistant",
            "content": ctx.string_field(data, "final", "final"),
            "_path": "final",
            "thinking": ctx.string_field(data, "analysis", "analysis", optional=True),
        },
    ]


# --- raw message dicts -> Conversation ------------------------------------------------------------


def _tools(ctx: _Row, raw: Any) -> tuple[dict, ...]:
    raw = _maybe_json(raw)
    if raw is None or raw == "":
        return ()
    if not isinstance(raw, list):
        raise ctx.error(
            f"expected a list of function schemas, found {type(raw).__name__}", "tools", "invalid_tools"
        )
    tools = []
    for i, tool in enumerate(raw):
        tool = _maybe_json(tool)
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ctx.error(
                'each tool needs a function name ({"type": "function", "function": {"name", '
                '"description", "parameters"}})',
                f"tools[{i}]",
                "invalid_tools",
            )
        path = f"tools[{i}].function" if function is not tool else f"tools[{i}]"
        for key, kind in (("description", str), ("parameters", dict)):
            if key in function and not isinstance(function[key], kind):
                raise ctx.error(
                    f"expected {'a string' if kind is str else 'a JSON schema object'}, "
                    f"found {type(function[key]).__name__}",
                    f"{path}.{key}",
                    "invalid_tools",
                )
        tools.append({"type": "function", "function": function})
    return tuple(tools)


def _content(ctx: _Row, message: dict, path: str, allow_missing: bool) -> str:
    value = message.get("content")
    if value is None:
        if allow_missing:
            return ""
        raise ctx.error("missing (expected a string)", f"{path}.content", "missing_content")
    if isinstance(value, list):  # OpenAI content parts
        texts = [part.get("text") for part in value if isinstance(part, dict) and part.get("type") == "text"]
        if len(texts) == len(value) and all(isinstance(t, str) for t in texts):
            return "".join(texts)
    if not isinstance(value, str):
        raise ctx.error(
            f"expected a string, found {type(value).__name__}", f"{path}.content", "invalid_content"
        )
    return value


def _thinking(ctx: _Row, message: dict, path: str) -> str | None:
    for key in THINKING_KEYS:
        value = message.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise ctx.error(
                f"expected a string or null, found {type(value).__name__}", f"{path}.{key}", "invalid_content"
            )
        return value or None
    return None


def _tool_calls(ctx: _Row, raw: Any, path: str) -> list[ToolCall]:
    raw = _maybe_json(raw)
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ctx.error("expected a list of tool calls", f"{path}.tool_calls", "invalid_tool_call")
    calls = []
    for i, item in enumerate(raw):
        call_path = f"{path}.tool_calls[{i}]"
        function = item.get("function", item) if isinstance(item, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ctx.error("a tool call needs function.name", call_path, "invalid_tool_call")
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments) if arguments.strip() else {}
            except json.JSONDecodeError:
                raise ctx.error(
                    "arguments is not valid JSON", f"{call_path}.function.arguments", "invalid_tool_call"
                ) from None
        if isinstance(item, dict) and isinstance(item.get("id"), str):
            ctx.calls[item["id"]] = function["name"]
        calls.append(ToolCall(function["name"], arguments))
    return calls


def _assistant_messages(ctx: _Row, message: dict, path: str) -> list[Message]:
    calls = _tool_calls(ctx, message.get("tool_calls"), path)
    content = _content(ctx, message, path, allow_missing=bool(calls))
    thinking = _thinking(ctx, message, path)
    if not calls:
        return [Message("assistant", content, thinking)]
    if content and thinking:
        raise ctx.error(
            "an assistant message with tool_calls has both content and thinking; keep the reasoning "
            "before the call in one of them",
            f"{path}.content",
            "invalid_tool_call",
        )
    # Text next to a call is the reasoning before it (the official template renders it as analysis).
    thinking = thinking or content or None
    return [Message("assistant", "", thinking if i == 0 else None, call) for i, call in enumerate(calls)]


def _tool_message(ctx: _Row, message: dict, path: str, last_call: str | None) -> Message:
    content = _content(ctx, message, path, allow_missing=False)
    name = ctx.calls.get(message.get("tool_call_id") or "") or message.get("name") or last_call
    if not isinstance(name, str):
        raise ctx.error(
            "a tool message needs a preceding assistant tool call (or a 'name')",
            f"{path}.role",
            "orphan_tool_message",
        )
    return Message("tool", content, tool_name=name)


def _conversation(
    ctx: _Row, raw_messages: list, tools: tuple[dict, ...], index: int, context: int = 0
) -> Conversation:
    """`context`: how many leading raw messages are context only."""
    if not raw_messages:
        raise ctx.error("the conversation is empty", "messages", "empty_conversation")
    messages: list[Message] = []
    dropped = context_messages = 0
    last_call: str | None = None
    for i, raw in enumerate(raw_messages):
        if i == context:
            context_messages = len(messages)
        path = raw.get("_path", f"messages[{i}]") if isinstance(raw, dict) else f"messages[{i}]"
        if not isinstance(raw, dict):
            raise ctx.error(f"expected an object, found {type(raw).__name__}", path, "invalid_field")
        role = raw.get("role")
        if role not in ROLES:
            raise ctx.error(
                f"unknown role {role!r} (use one of {', '.join(ROLES)})", f"{path}.role", "unknown_role"
            )
        if role in ("system", "developer"):
            content = _content(ctx, raw, path, allow_missing=False)
            if messages:  # only a leading system/developer message is rendered, by both templates
                dropped += 1
            else:
                messages.append(Message(role, content))
        elif role == "user":
            messages.append(Message("user", _content(ctx, raw, path, allow_missing=False)))
        elif role == "assistant":
            new = _assistant_messages(ctx, raw, path)
            last_call = next((m.tool_call.name for m in reversed(new) if m.tool_call), last_call)
            messages.extend(new)
        else:
            messages.append(_tool_message(ctx, raw, path, last_call))
    if context >= len(raw_messages):
        context_messages = len(messages)
    if not any(m.role == "assistant" for m in messages):
        raise ctx.error(
            "the conversation has no assistant message, so nothing to train on", "messages", "no_assistant"
        )
    return Conversation(tuple(messages), tools, index, ctx.row.file, ctx.row.row, dropped, context_messages)
