"""The conversion layer: GGUF and llama2.c files to mlx-lm model folders."""
