"""Models: mlx-lm folders or GGUF files on the server (registered by path) or uploaded GGUF files."""
