"""Ages: ``label-ages`` (stage.py), the age sources (sources.py), the DEX classifier (dex.py) and the
regularisation set (reg.py: ``--reg`` folders and ``make-reg``). See docs/ages.md."""
