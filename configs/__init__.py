"""Bundled model configs and tokenizer files, installed as the package data sdrun.configs (see setup.py)."""
