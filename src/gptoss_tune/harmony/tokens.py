"""Token ids of o200k_harmony that the code relies on (checked against openai-harmony in tests)."""

START_OF_TEXT = 199998
END_OF_TEXT = 199999
RETURN = 200002
CONSTRAIN = 200003
CHANNEL = 200005
START = 200006
END = 200007
MESSAGE = 200008
CALL = 200012
ASSISTANT = 173781  # the word "assistant" right after <|start|>

TERMINALS = frozenset({RETURN, END, CALL})
VOCAB_SIZE = 201088  # the model's padded vocabulary; never resized
IGNORE_INDEX = -100

SPECIAL_TOKENS = {
    "<|startoftext|>": START_OF_TEXT,
    "<|endoftext|>": END_OF_TEXT,
    "<|return|>": RETURN,
    "<|constrain|>": CONSTRAIN,
    "<|channel|>": CHANNEL,
    "<|start|>": START,
    "<|end|>": END,
    "<|message|>": MESSAGE,
    "<|call|>": CALL,
}
