"""Building jobs from paths, folders, globs, bytes and streams, and sending them."""

from producer.submit import submit_bytes, submit_paths

__all__ = ["submit_bytes", "submit_paths"]
