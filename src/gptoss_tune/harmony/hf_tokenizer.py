"""Build gpt-oss's Hugging Face tokenizer (tokenizer.json) offline from the o200k vocabulary.

The result encodes like openai-harmony's o200k_harmony (checked in tests), so checkpoints we write
(tiny test models, merges of bases without tokenizer files) open in transformers and vLLM.
"""

from __future__ import annotations

import functools

from gptoss_tune.harmony import tokens as T
from gptoss_tune.harmony.vocab import resolve_vocab_file

# tiktoken's o200k_base split pattern.
O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
NAMED_SPECIALS = {token_id: name for name, token_id in T.SPECIAL_TOKENS.items()} | {200018: "<|endofprompt|>"}
LAST_SPECIAL = 200018  # the published tokenizer.json lists added tokens up to here


def special_token_names() -> list[str]:
    """Names of ids 199998..200018 in order, as in the published gpt-oss tokenizer."""
    return [NAMED_SPECIALS.get(i, f"<|reserved_{i}|>") for i in range(T.START_OF_TEXT, LAST_SPECIAL + 1)]


@functools.cache
def build_hf_tokenizer():
    """A transformers PreTrainedTokenizerFast equal to gpt-oss's (about 6 s; cached per process)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    names = special_token_names()
    converter = TikTokenConverter(
        vocab_file=str(resolve_vocab_file()), pattern=O200K_PATTERN, extra_special_tokens=names
    )
    backend = converter.converted()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|startoftext|>",
        eos_token="<|return|>",
        pad_token="<|endoftext|>",
        model_input_names=["input_ids", "attention_mask"],
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )
    for name, token_id in zip(names, range(T.START_OF_TEXT, LAST_SPECIAL + 1), strict=True):
        if tokenizer.convert_tokens_to_ids(name) != token_id:
            raise AssertionError(
                f"special token {name} got id {tokenizer.convert_tokens_to_ids(name)}, not {token_id}"
            )
    return tokenizer
