"""Readers of input series and writers of outputs."""
