"""Reasoning-language adherence: asked to reason in language X ("reasoning language: X", as in
Multilingual-Thinking), how often is the analysis written in X?

Each prompt is rendered with the instruction for its language, the model generates its analysis
(generation stops at the end of the first message: the final answer is not needed), and py3langid,
whose model ships inside the wheel, identifies the analysis's language. This is the metric the
Multilingual-Thinking fine-tune exists to move.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from gptoss_tune.data.conversation import Conversation, Message
from gptoss_tune.data.load import BUNDLED_SAMPLE, bundled_sample_path
from gptoss_tune.errors import GptossTuneError
from gptoss_tune.harmony.render import RenderOptions
from gptoss_tune.harmony.vocab import harmony_encoding
from gptoss_tune.infer.generate import Completion, Generator, SamplingOptions
from gptoss_tune.infer.prompt import generation_prompt, instructions_text

# The languages of HuggingFaceH4/Multilingual-Thinking.

# English names of the languages py3langid identifies (ISO 639-1 codes, or 639-3 where there is none).
_LANGUAGE_TABLE = """
af Afrikaans; am Amharic; an Aragonese; ar Arabic; as Assamese; az Azerbaijani; be Belarusian;
bg Bulgarian; bn Bengali; br Breton; bs Bosnian; ca Catalan; cs Czech; cy Welsh; da Danish; de German;
el Greek; en English; eo Esperanto; es Spanish; et Estonian; eu Basque; fa Persian; fi Finnish;
fo Faroese; fr French; fy Frisian; ga Irish; gd Scottish Gaelic; gl Galician; gu Gujarati; ha Hausa;
he Hebrew; hi Hindi; hr Croatian; ht Haitian Creole; hu Hungarian; hy Armenian; id Indonesian; ig Igbo;
is Icelandic; it Italian; ja Japanese; jv Javanese; ka Georgian; kk Kazakh; km Khmer; kn Kannada;
ko Korean; ku Kurdish; ky Kyrgyz; la Latin; lb Luxembourgish; lg Ganda; ln Lingala; lo Lao;
lt Lithuanian; lv Latvian; mg Malagasy; mk Macedonian; ml Malayalam; mn Mongolian; mr Marathi;
ms Malay; mt Maltese; my Burmese; ne Nepali; nl Dutch; nn Norwegian Nynorsk; no Norwegian; oc Occitan;
om Oromo; or Odia; pa Punjabi; pl Polish; ps Pashto; pt Portuguese; qu Quechua; ro Romanian;
ru Russian; rw Kinyarwanda; sa Sanskrit; se Northern Sami; si Sinhala; sk Slovak; sl Slovenian;
sn Shona; so Somali; sq Albanian; sr Serbian; st Sotho; sv Swedish; sw Swahili; ta Tamil; te Telugu;
tg Tajik; th Thai; tk Turkmen; tl Tagalog; tr Turkish; tt Tatar; ug Uyghur; uk Ukrainian; ur Urdu;
uz Uzbek; vi Vietnamese; vo Volapuk; wa Walloon; xh Xhosa; yo Yoruba; zh Chinese; zu Zulu
"""
LANGUAGE_NAMES: dict[str, str] = dict(
    entry.strip().split(" ", 1) for entry in _LANGUAGE_TABLE.replace("\n", " ").split(";") if entry.strip()
)
LANGUAGE_CODES: dict[str, str] = {name.lower(): code for code, name in LANGUAGE_NAMES.items()}
NO_ANALYSIS = "none"  # detected language of an empty analysis


def language_code(language: str) -> str:
    """'French', 'french' or 'fr' -> 'fr'."""
    text = language.strip()
    if text.lower() in LANGUAGE_NAMES:
        return text.lower()
    if text.lower() in LANGUAGE_CODES:
        return LANGUAGE_CODES[text.lower()]
    raise GptossTuneError(
        f"Unknown language '{language}': use an English name (French) or an ISO 639-1 code (fr) of a "
        "language the identifier knows, e.g. " + ", ".join(sorted(LANGUAGE_NAMES.values())[:12]) + ", ..."
    )


@functools.cache
def _identifier():
    try:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier
    except ImportError:
        raise GptossTuneError(
            "The reasoning-language eval needs the language identifier py3langid: `pip install py3langid`."
        ) from None
    return LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)


def identify_language(text: str) -> tuple[str, float]:
    """(language code, probability) of a text; (`none`, 0) for an empty one."""
    if not text.strip():
        return NO_ANALYSIS, 0.0
    code, probability = _identifier().classify(text)
    return str(code), float(probability)


# ---------------------------------------------------------------------------------------------------
# Prompts
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguagePrompt:
    prompt: str
    language: str  # as asked ("French"): it is written into the instruction verbatim
    developer: str | None = None


def _rows(source: str) -> list[dict]:
    path = bundled_sample_path() if source == BUNDLED_SAMPLE else Path(source)
    if not path.is_file():
        raise GptossTuneError(f"{source}: no such prompts file (use a .jsonl/.json/.txt file or 'sample').")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".txt":
        return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]
    try:
        if path.suffix == ".json":
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError as exc:
        raise GptossTuneError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise GptossTuneError(f"{path}: expected objects with a 'prompt' (or 'user') field.")
    return rows


def load_prompts(source: str, languages: list[str] | None = None) -> list[LanguagePrompt]:
    """Prompts from a .jsonl/.json file of {prompt or user, reasoning_language?, developer?}, a .txt
    file (one prompt a line) or `sample` (the bundled sample). With `languages`, every prompt is asked
    in each of them; otherwise in its own `reasoning_language`."""
    prompts = []
    for number, row in enumerate(_rows(source), start=1):
        text = row.get("prompt", row.get("user"))
        if not isinstance(text, str) or not text.strip():
            raise GptossTuneError(f"{source}, row {number}: no 'prompt' (or 'user') text.")
        asked = languages or ([row["reasoning_language"]] if row.get("reasoning_language") else [])
        if not asked:
            raise GptossTuneError(
                f"{source}, row {number}: no 'reasoning_language'; give one per row or pass --languages."
            )
        for language in asked:
            language_code(language)  # fail early on a language the identifier does not know
            prompts.append(LanguagePrompt(text, language, row.get("developer") or None))
    if not prompts:
        raise GptossTuneError(f"{source}: no prompts.")
    return prompts


def prompt_conversation(item: LanguagePrompt) -> Conversation:
    system = instructions_text(item.developer, item.language)
    return Conversation((Message("system", system), Message("user", item.prompt)))


# ---------------------------------------------------------------------------------------------------
# Generating and scoring
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LanguageResult:
    prompt: str
    language: str
    expected: str  # language code
    detected: str  # language code, or "none" without analysis
    probability: float
    analysis: str
    model: str  # "base" or "adapter" (with an adapter), else "model"

    @property
    def adherent(self) -> bool:
        return self.detected == self.expected


def score_completion(item: LanguagePrompt, completion: Completion, model: str) -> LanguageResult:
    detected, probability = identify_language(completion.analysis)
    return LanguageResult(
        item.prompt,
        item.language,
        language_code(item.language),
        detected,
        probability,
        completion.analysis,
        model,
    )


@dataclass
class LanguageScore:
    asked: int = 0
    adherent: int = 0
    no_analysis: int = 0
    detected: Counter = field(default_factory=Counter)

    @property
    def share(self) -> float:
        return self.adherent / self.asked if self.asked else 0.0

    def to_dict(self) -> dict:
        return {
            "asked": self.asked,
            "adherent": self.adherent,
            "share": self.share,
            "no_analysis": self.no_analysis,
            "detected": dict(self.detected.most_common()),
        }


def score(results: list[LanguageResult]) -> dict[str, dict[str, LanguageScore]]:
    """model -> language (as asked) -> score; language `all` sums over languages."""
    scores: dict[str, dict[str, LanguageScore]] = {}
    for result in results:
        by_language = scores.setdefault(result.model, {})
        for key in (result.language, "all"):
            entry = by_language.setdefault(key, LanguageScore())
            entry.asked += 1
            entry.adherent += result.adherent
            entry.no_analysis += result.detected == NO_ANALYSIS
            entry.detected[result.detected] += 1
    for by_language in scores.values():  # `all` last
        by_language["all"] = by_language.pop("all")
    return scores


def run_language_eval(
    generator: Generator,
    prompts: list[LanguagePrompt],
    render_options: RenderOptions,
    sampling: SamplingOptions,
    on_prompt: Callable[[], None] = lambda: None,
) -> list[LanguageResult]:
    """Generate for every prompt (with the base model and with the adapter when the generator has
    one, else with the model alone) up to the end of the first message, and score each analysis."""
    models = ["base", "adapter"] if generator.has_adapter else ["model"]
    stops = sorted(harmony_encoding().stop_tokens())  # <|end|> too: the analysis is the first message
    rendered = [generation_prompt(prompt_conversation(item), render_options) for item in prompts]
    results = []
    for model in models:
        for item, prompt_ids in zip(prompts, rendered, strict=True):
            completion = generator.complete(
                prompt_ids, sampling, use_adapter=model == "adapter", stop_tokens=stops
            )
            results.append(score_completion(item, completion, model))
            on_prompt()
    return results


def report(results: list[LanguageResult], settings: dict) -> dict:
    """The JSON report: settings, scores per model and language, and every result."""
    return {
        "settings": settings,
        "scores": {
            model: {language: entry.to_dict() for language, entry in by_language.items()}
            for model, by_language in score(results).items()
        },
        "results": [asdict(result) | {"adherent": result.adherent} for result in results],
    }
