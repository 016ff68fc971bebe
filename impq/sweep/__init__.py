"""Searches over what the phone runs: resolution, vision tokens and weight precision together."""
