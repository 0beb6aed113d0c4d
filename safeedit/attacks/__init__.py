"""Attacks used to build realistic threat settings: harmful fine-tuning mixes (and, later, backdoor triggers)."""
