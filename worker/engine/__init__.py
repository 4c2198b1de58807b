"""MLX distillation engine: models, data, teacher cache, losses, training, evaluation.

Importing this package does not import MLX; the submodules that need it do.
"""
