"""The command-line door: predict (in-process or against a server), import-model, ..."""
