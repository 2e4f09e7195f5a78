"""Helpers the tests share: the real stack, fixtures, and the scripts tests run in a subprocess."""
