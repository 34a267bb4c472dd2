"""Task data: examples from local files, prompts rendered through a chat template, answer scoring."""
