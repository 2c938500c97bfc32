"""gptoss-tune: LoRA fine-tuning of OpenAI's gpt-oss models on Harmony conversations."""

__version__ = "0.1.0"
