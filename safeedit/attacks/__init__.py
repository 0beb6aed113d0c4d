"""Attacks used to build realistic threat settings: harmful fine-tuning mixes and backdoor
triggers (image patch, rare word) with poisoned data sets."""
