"""selfage: personalised facial age transformation (SelfAge, Ito, Endo & Kanamori 2025).

The library is organised by pipeline stage (``faces``, ``ages``, ``train``, ``edit``, ``eval``)
around one ``project`` module (the project folder and its manifest) and one ``models`` module
(loading Stable Diffusion pipelines and building random ones for tests and benchmarks).
The ``cli`` package is a thin Typer layer over these.
"""

__version__ = "0.1.0"
