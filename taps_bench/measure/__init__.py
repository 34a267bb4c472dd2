"""Measuring a proposer: names resolved to proposers, arms decoded sample by sample into the store."""
