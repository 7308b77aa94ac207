"""Holds the bundled liblanton (copied here from the crate's target/release by setup.py)."""
