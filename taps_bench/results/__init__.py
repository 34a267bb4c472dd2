"""The results store (raw counters), its migrations, and everything derived from stored samples."""
