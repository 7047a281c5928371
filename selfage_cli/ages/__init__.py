"""Ages: ``label-ages`` (stage.py) and the regularisation set (regularisation.py: ``--reg`` folders
and ``make-reg``); the estimators, age sources and image generation they call are in engine/.
See docs/ages.md."""
