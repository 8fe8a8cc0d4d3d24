"""Tests of llmspeed.quant (a package, so test module names cannot clash with other folders)."""
