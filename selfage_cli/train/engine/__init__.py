"""The training engine: the LoRA DreamBooth loop and its maths (contrastive loss, CUDA-graph step),
the training data, LoRA injection and saving, checkpoints and validation grids.

Pipelines, images and a ``TrainConfig`` in, LoRA weights and checkpoints (in a given run folder)
out; nothing here reads or writes a project manifest (``selfage_cli.train.stage`` does). See
docs/architecture.md.
"""
