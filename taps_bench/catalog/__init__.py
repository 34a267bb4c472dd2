"""What taps-bench knows by name: card schemas, YAML reading, the registry."""
