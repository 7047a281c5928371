"""The age engine: the age estimators (DEX, builtin), the age sources (names, EXIF, ages files) and
the generation of regularisation images.

Images, paths and models in, ages and images out; nothing here reads or writes a project (the
stages ``selfage_cli.ages.stage`` and ``selfage_cli.ages.regularisation`` do). See docs/architecture.md.
"""
