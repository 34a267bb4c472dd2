"""The networks: target models (loaded from cards) and EAGLE drafters (module and checkpoint format)."""
