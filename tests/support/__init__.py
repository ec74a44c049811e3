"""Helpers shared by the test tiers: tiny model checkpoints, generated images, processes."""
