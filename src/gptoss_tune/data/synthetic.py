"""Synthetic conversations shaped like a known dataset, for benchmarks and smoke tests without downloads.

`make_synthetic_rows(like="multilingual-thinking")` returns rows with the columns of
HuggingFaceH4/Multilingual-Thinking (reasoning_language, developer, user, analysis, final, messages).
The text is random words from a small per-language list, but the token lengths follow the real
dataset as rendered by gpt-oss's chat template: a lognormal on the total (median ~1k tokens, long
tail clipped at 4,096), split roughly 10% user, 45% analysis, 45% final.

Lengths are hit with the real tokenizer without encoding word by word: the token cost of every word
of the list is measured once, text is cut where the running cost reaches the target, and each field
is encoded once to correct the small drift.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.files import atomic_file
from gptoss_tune.harmony.render import RenderOptions, render
from gptoss_tune.harmony.vocab import harmony_encoding

SUPPORTED_LIKES = ("multilingual-thinking",)
_LIKE_ALIASES = {
    "multilingual-thinking": "multilingual-thinking",
    "huggingfaceh4/multilingual-thinking": "multilingual-thinking",
}

REASONING_LANGUAGES = ("English", "French", "German", "Spanish", "Italian")
USER_WRITES_ENGLISH_PROBABILITY = 0.6  # otherwise the user writes in the reasoning language

TOTAL_TOKENS_MEDIAN = 1040
TOTAL_TOKENS_SIGMA = 0.45
TOTAL_TOKENS_MIN = 300
TOTAL_TOKENS_MAX = 4096
LENGTH_HEADROOM_TOKENS = 8  # the per-field estimate can drift by a few tokens; stay inside [MIN, MAX]
USER_SHARE_RANGE = (0.06, 0.14)  # share of the content tokens; the rest is split analysis / final
ANALYSIS_SHARE_OF_REST_RANGE = (0.40, 0.60)
MIN_FIELD_TOKENS = 4
TOLERATED_DRIFT_TOKENS = 2

SENTENCE_WORDS_RANGE = (5, 15)  # inclusive low, exclusive high
COMMA_PROBABILITY = 0.08
_SUFFIXES = ("", ".", "?", "!", ",")
_END_MARK_WEIGHTS = (0.8, 0.1, 0.1)  # ".", "?", "!"

DEVELOPER_PROMPTS = (
    "You are a helpful assistant.",
    "You are a friendly tutor who explains things step by step.",
    "You are an AI chatbot with a warm and playful personality.",
    "You are a precise assistant who answers with care and checks every detail.",
    "You are a travel companion who loves sharing practical tips.",
    "You are a patient cooking coach who keeps instructions simple.",
    "You are a curious science explainer who enjoys everyday examples.",
    "You are a concise writing assistant focused on clarity.",
)

# Space-separated word lists; German nouns keep their capital letter.
_WORD_LISTS = {
    "English": (
        "the a and to of in is it that we you this for with on answer question water light time city "
        "river number recipe history garden window simple careful quickly because however maybe should "
        "would explain consider measure travel morning evening bright quiet heavy example reason result "
        "people market bridge mountain kitchen letter story distance minutes several important probably "
        "together"
    ),
    "French": (
        "le la les un une et de du en est que qui pour avec dans réponse question eau lumière temps "
        "ville rivière nombre recette histoire jardin fenêtre simple prudent rapidement parce cependant "
        "peut-être devrait expliquer considérer mesurer voyager matin soir clair calme lourd exemple "
        "raison résultat gens marché pont montagne cuisine lettre récit distance minutes plusieurs "
        "important sûrement ensemble déjà très où"
    ),
    "German": (
        "der die das ein eine und zu von in ist dass wir für mit auf Antwort Frage Wasser Licht Zeit "
        "Stadt Fluss Zahl Rezept Geschichte Garten Fenster einfach vorsichtig schnell weil jedoch "
        "vielleicht sollte würde erklären betrachten messen reisen Morgen Abend hell ruhig schwer "
        "Beispiel Grund Ergebnis Menschen Markt Brücke Berg Küche Brief Erzählung Entfernung Minuten "
        "mehrere wichtig wahrscheinlich zusammen schön größer"
    ),
    "Spanish": (
        "el la los un una y de del en es que para con por se respuesta pregunta agua luz tiempo ciudad "
        "río número receta historia jardín ventana sencillo cuidadoso rápidamente porque sin quizás "
        "debería explicar considerar medir viajar mañana tarde claro tranquilo pesado ejemplo razón "
        "resultado gente mercado puente montaña cocina carta relato distancia minutos varios importante "
        "probablemente juntos también así"
    ),
    "Italian": (
        "il la gli un una e di del in è che per con su si risposta domanda acqua luce tempo città fiume "
        "numero ricetta storia giardino finestra semplice attento velocemente perché tuttavia forse "
        "dovrebbe spiegare considerare misurare viaggiare mattina sera chiaro tranquillo pesante esempio "
        "ragione risultato persone mercato ponte montagna cucina lettera racconto distanza minuti "
        "diversi importante probabilmente insieme già più"
    ),
}
WORDS: dict[str, tuple[str, ...]] = {language: tuple(text.split()) for language, text in _WORD_LISTS.items()}


@dataclass(frozen=True)
class _Lexicon:
    """A language's words in two forms (lower then capitalized), with the token cost of ' form'."""

    forms: tuple[str, ...]
    costs: np.ndarray

    @property
    def size(self) -> int:
        return len(self.forms) // 2

    @property
    def mean_cost(self) -> float:
        return float(self.costs.mean())


def _count_tokens(text: str) -> int:
    return len(harmony_encoding().encode(text, disallowed_special=()))


@functools.cache
def _lexicon(language: str) -> _Lexicon:
    words = WORDS[language]
    forms = tuple(words) + tuple(word[:1].upper() + word[1:] for word in words)
    costs = np.array([_count_tokens(" " + form) for form in forms], dtype=np.int64)
    return _Lexicon(forms=forms, costs=costs)


@functools.cache
def chat_template_overhead_tokens() -> int:
    """Tokens the gpt-oss chat template adds around one single-turn conversation (excluding contents):
    our renderer on a conversation whose four texts (developer, user, analysis, final) are one token each."""
    one_token_texts = Conversation(
        (Message("system", "x"), Message("user", "x"), Message("assistant", "x", "x"))
    )
    return len(render(one_token_texts, RenderOptions()).ids) - 4


@functools.cache
def _system_content_tokens(system_content: str) -> int:
    return _count_tokens(system_content)


def _normalize_like(like: str) -> str:
    shape = _LIKE_ALIASES.get(like.strip().lower())
    if shape is None:
        accepted = ", ".join(SUPPORTED_LIKES)
        raise GptossTuneError(f"Unknown synthetic dataset shape like={like!r}. Accepted values: {accepted}.")
    return shape


def _sample_total_tokens(rng: np.random.Generator) -> int:
    total = rng.lognormal(math.log(TOTAL_TOKENS_MEDIAN), TOTAL_TOKENS_SIGMA)
    low, high = TOTAL_TOKENS_MIN + LENGTH_HEADROOM_TOKENS, TOTAL_TOKENS_MAX - LENGTH_HEADROOM_TOKENS
    return int(min(max(round(total), low), high))


def _split_content_tokens(rng: np.random.Generator, content_tokens: int) -> tuple[int, int, int]:
    """Split a token budget into (user, analysis, final)."""
    user = max(MIN_FIELD_TOKENS, round(content_tokens * rng.uniform(*USER_SHARE_RANGE)))
    rest = max(2 * MIN_FIELD_TOKENS, content_tokens - user)
    analysis = max(MIN_FIELD_TOKENS, round(rest * rng.uniform(*ANALYSIS_SHARE_OF_REST_RANGE)))
    return user, analysis, max(MIN_FIELD_TOKENS, rest - analysis)


@dataclass(frozen=True)
class _WordPlan:
    """Drawn words (indices into _Lexicon.forms), their punctuation, and the running token cost."""

    form_ids: np.ndarray
    suffix_ids: np.ndarray
    cumulative_cost: np.ndarray


def _plan_words(rng: np.random.Generator, lexicon: _Lexicon, target_tokens: int) -> _WordPlan:
    """Draw more words than needed, laid out in sentences, with the token cost of each prefix."""
    count = int(target_tokens / lexicon.mean_cost * 1.3) + 2 * SENTENCE_WORDS_RANGE[1]
    word_ids = rng.integers(0, lexicon.size, size=count)
    sentence_lengths = rng.integers(*SENTENCE_WORDS_RANGE, size=count // SENTENCE_WORDS_RANGE[0] + 1)
    sentence_ends = np.cumsum(sentence_lengths) - 1
    sentence_ends = sentence_ends[sentence_ends < count]

    ends = np.zeros(count, dtype=bool)
    ends[sentence_ends] = True
    starts = np.zeros(count, dtype=bool)
    starts[0] = True
    starts[sentence_ends[sentence_ends + 1 < count] + 1] = True

    end_marks = rng.choice(3, size=count, p=_END_MARK_WEIGHTS) + 1  # 1 ".", 2 "?", 3 "!"
    commas = (rng.random(count) < COMMA_PROBABILITY) & ~ends
    suffix_ids = np.where(ends, end_marks, np.where(commas, 4, 0))
    form_ids = word_ids + np.where(starts, lexicon.size, 0)
    costs = lexicon.costs[form_ids] + (suffix_ids > 0)
    return _WordPlan(form_ids=form_ids, suffix_ids=suffix_ids, cumulative_cost=np.cumsum(costs))


def _render_words(plan: _WordPlan, lexicon: _Lexicon, target_tokens: int) -> str:
    """Join the shortest prefix of the plan whose estimated cost reaches target_tokens, ending a sentence."""
    word_count = int(np.searchsorted(plan.cumulative_cost, max(target_tokens - 1, 1))) + 1
    word_count = min(max(word_count, 1), len(plan.form_ids))
    forms = [lexicon.forms[i] for i in plan.form_ids[:word_count].tolist()]
    suffixes = plan.suffix_ids[:word_count].tolist()
    suffixes[-1] = suffixes[-1] if 0 < suffixes[-1] < 4 else 1
    return " ".join(form + _SUFFIXES[suffix] for form, suffix in zip(forms, suffixes, strict=True))


def _random_text(rng: np.random.Generator, language: str, target_tokens: int) -> str:
    """Random sentences in `language` of about `target_tokens` tokens (one encode to correct the estimate)."""
    lexicon = _lexicon(language)
    plan = _plan_words(rng, lexicon, target_tokens)
    text = _render_words(plan, lexicon, target_tokens)
    drift = _count_tokens(text) - target_tokens
    if abs(drift) > TOLERATED_DRIFT_TOKENS:
        text = _render_words(plan, lexicon, target_tokens - drift)
    return text


def _multilingual_thinking_row(rng: np.random.Generator) -> dict:
    language = REASONING_LANGUAGES[int(rng.integers(len(REASONING_LANGUAGES)))]
    developer = DEVELOPER_PROMPTS[int(rng.integers(len(DEVELOPER_PROMPTS)))]
    user_language = "English" if rng.random() < USER_WRITES_ENGLISH_PROBABILITY else language
    system_content = f"reasoning language: {language}\n\n{developer}"

    total_tokens = _sample_total_tokens(rng)
    content_tokens = total_tokens - chat_template_overhead_tokens() - _system_content_tokens(system_content)
    user_tokens, analysis_tokens, final_tokens = _split_content_tokens(rng, content_tokens)
    user = _random_text(rng, user_language, user_tokens)
    analysis = _random_text(rng, language, analysis_tokens)
    final = _random_text(rng, user_language, final_tokens)
    return {
        "reasoning_language": language,
        "developer": developer,
        "user": user,
        "analysis": analysis,
        "final": final,
        "messages": [
            {"content": system_content, "role": "system", "thinking": None},
            {"content": user, "role": "user", "thinking": None},
            {"content": final, "role": "assistant", "thinking": analysis},
        ],
    }


def make_synthetic_rows(like: str = "multilingual-thinking", rows: int = 1000, seed: int = 0) -> list[dict]:
    """`rows` random conversations with the columns and token-length profile of the dataset `like`.

    Deterministic for a given seed. Accepted `like`: see SUPPORTED_LIKES (the Hub id
    "HuggingFaceH4/Multilingual-Thinking" is accepted too).
    """
    _normalize_like(like)
    if rows < 0:
        raise GptossTuneError(f"rows must be >= 0, got {rows}.")
    rng = np.random.default_rng(seed)
    return [_multilingual_thinking_row(rng) for _ in range(rows)]


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> Path:
    """Write rows as UTF-8 JSON lines, atomically (a temporary sibling file, then os.replace)."""
    with atomic_file(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    return Path(path)
