"""The evaluation engine: the age-error and identity metrics over plain numbers.

Nothing here reads or writes a project (``selfage_cli.eval.stage`` does). See docs/architecture.md.
"""
