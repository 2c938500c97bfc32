"""How the data a model was fine-tuned on was rendered (template, date, reasoning effort), so that chat
and eval prompt it the same way by default.

Found in an adapter's own record (gptoss_tune_adapter.json, written by train), else next to it (the
training run folder holds config.yaml and, when train prepared the data, data/prepare.json), or in a
merged checkpoint's gptoss_tune_merge.json.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from gptoss_tune.data.prepare import PREPARE_INFO, RENDER_KEYS
from gptoss_tune.files import read_json_object
from gptoss_tune.model.lora import ADAPTER_RECORD

RUN_CONFIG = "config.yaml"
MERGE_RECORD = "gptoss_tune_merge.json"
_RUN_SEARCH_DEPTH = 3  # RUN/checkpoints/step-N[/adapter]


def _read_json(path: Path) -> dict:
    return read_json_object(path, "fix or delete the file.")


def _render_fields(values: dict) -> dict[str, str] | None:
    found = {key: values[key] for key in RENDER_KEYS if values.get(key)}
    return found if len(found) == len(RENDER_KEYS) else None


def _from_run_folder(run: Path) -> dict[str, str] | None:
    config = yaml.safe_load((run / RUN_CONFIG).read_text()) or {}
    candidates = [run / "data" / PREPARE_INFO]
    if config.get("data"):
        candidates.append(Path(str(config["data"])) / PREPARE_INFO)
    for info in candidates:
        if info.is_file():  # the prepared data's own options win over the run's defaults
            return _render_fields(_read_json(info).get("options", {}))
    return _render_fields(config)


def _run_folder_of(adapter: Path) -> Path | None:
    """The training run an adapter was written by: RUN/adapter or RUN/checkpoints/<step>/..."""
    if adapter.name == "adapter" and (adapter.parent / RUN_CONFIG).is_file():
        return adapter.parent
    for folder in adapter.parents[:_RUN_SEARCH_DEPTH]:
        if folder.name == "checkpoints" and (folder.parent / RUN_CONFIG).is_file():
            return folder.parent
    return None


def training_render_settings(adapter_or_model: str | Path | None) -> dict[str, str] | None:
    """{template, date, reasoning_effort} of the fine-tuning data of an adapter (from its training run
    folder) or of a merged model (from its merge record); None when unknown."""
    if adapter_or_model is None:
        return None
    path = Path(adapter_or_model)
    for record in (path / MERGE_RECORD, path / ADAPTER_RECORD):
        if record.is_file():
            return _render_fields(_read_json(record).get("render") or {})
    run = _run_folder_of(Path(os.path.abspath(path)))  # not resolve(): a linked adapter is where it is linked
    return _from_run_folder(run) if run is not None else None
