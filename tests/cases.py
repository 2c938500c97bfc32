"""Raw dataset rows covering every shape `prepare` accepts, shared by the tests."""

from __future__ import annotations

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "location": {"type": "string", "description": "City name"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
                "days": {"type": "integer"},
                "tags": {"type": "array", "items": {"type": "string"}},
            },
            "required": ["location"],
        },
    },
}
TIME_TOOL = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time",
        "parameters": {"type": "object", "properties": {}},
    },
}

MESSAGES_ROWS = {
    "mt": {
        "messages": [
            {
                "role": "system",
                "content": "reasoning language: French\n\nYou are a cheerful assistant.",
                "thinking": None,
            },
            {"role": "user", "content": "Pourquoi le ciel est-il bleu ?", "thinking": None},
            {
                "role": "assistant",
                "content": "À cause de la diffusion de Rayleigh.",
                "thinking": "L'utilisateur demande la couleur du ciel. Je dois expliquer la diffusion.",
            },
        ]
    },
    "no_system_no_thinking": {
        "messages": [
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi!"},
        ]
    },
    "multi_turn_thinking": {
        "messages": [
            {"role": "developer", "content": "Answer briefly."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4", "thinking": "Simple addition."},
            {"role": "user", "content": "And times 3?"},
            {"role": "assistant", "content": "12", "reasoning_content": "4 * 3 = 12."},
            {"role": "user", "content": "Thanks!"},
            {"role": "assistant", "content": "You're welcome 😊", "reasoning": ""},
        ]
    },
    "multi_turn_mixed_thinking": {
        "messages": [
            {"role": "user", "content": "Écris un haïku.\nSur la mer."},
            {"role": "assistant", "content": "Vagues sous la lune", "thinking": None},
            {"role": "user", "content": "Another, about  spaces  "},
            {
                "role": "assistant",
                "content": " leading and trailing ",
                "thinking": "Keep the spaces\n\n exactly.",
            },
        ]
    },
    "literal_special_text": {
        "messages": [
            {"role": "user", "content": "What does <|end|> mean? And <|start|>assistant<|channel|>final?"},
            {
                "role": "assistant",
                "content": "It ends a message: <|end|>",
                "thinking": "Explain <|return|> too.",
            },
        ]
    },
    "tool_call": {
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "messages": [
            {"role": "system", "content": "You can check the weather."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "thinking": "I should call the weather tool.",
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "clear"}'},
            {
                "role": "assistant",
                "content": "It is 21 °C and clear in Paris.",
                "thinking": "Report the result.",
            },
        ],
    },
    "tool_call_content_as_analysis": {
        "tools": [WEATHER_TOOL],
        "messages": [
            {"role": "user", "content": "Is it warm in Rome?"},
            {
                "role": "assistant",
                "content": "Let me look it up.",
                "tool_calls": [
                    {
                        "type": "function",
                        "function": {
                            "name": "get_weather",
                            "arguments": {"location": "Rome", "unit": "celsius"},
                        },
                    }
                ],
            },
            {"role": "tool", "content": "30 degrees"},
        ],
    },
    "parallel_tool_calls": {
        "tools": [WEATHER_TOOL, TIME_TOOL],
        "messages": [
            {"role": "user", "content": "Weather and time in Oslo?"},
            {
                "role": "assistant",
                "content": "",
                "thinking": "Two calls.",
                "tool_calls": [
                    {
                        "id": "a",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"location": "Oslo"}'},
                    },
                    {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}},
                ],
            },
            {"role": "tool", "tool_call_id": "a", "content": "cold"},
            {"role": "tool", "tool_call_id": "b", "content": "noon"},
            {"role": "assistant", "content": "Cold, and it is noon."},
        ],
    },
    "empty_final": {
        "messages": [
            {"role": "user", "content": "Reply with nothing."},
            {"role": "assistant", "content": "", "thinking": "Nothing it is."},
        ]
    },
}

SHAPE_ROWS = {
    "sharegpt": {
        "conversations": [
            {"from": "system", "value": "You are terse."},
            {"from": "human", "value": "Capital of Italy?"},
            {"from": "gpt", "value": "Rome."},
            {"from": "human", "value": "And Spain?"},
            {"from": "gpt", "value": "Madrid."},
        ]
    },
    "alpaca": {
        "instruction": "Translate to German.",
        "input": "Good morning",
        "output": "Guten Morgen",
        "system": "You translate.",
    },
    "alpaca_no_input": {"instruction": "Name a prime number.", "input": "", "output": "7"},
    "prompt_completion_strings": {"prompt": "Complete: the quick brown", "completion": "fox"},
    "prompt_completion_messages": {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello"}],
        "completion": [{"role": "assistant", "content": "Hello to you!", "thinking": "Greet back."}],
    },
    "mt_columns": {
        "reasoning_language": "German",
        "developer": "You are helpful.",
        "user": "Wie spät ist es?",
        "analysis": "Der Nutzer fragt nach der Uhrzeit.",
        "final": "Ich habe keine Uhr.",
    },
}

ALL_ROWS = {**MESSAGES_ROWS, **SHAPE_ROWS}
