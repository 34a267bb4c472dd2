"""Matrix runs: a YAML spec expanded into cells, run locally or on Ray."""
