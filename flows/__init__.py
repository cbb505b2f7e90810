"""Prefect flows and the llmcycle command line."""
