"""Tests of llmspeed.generation."""
