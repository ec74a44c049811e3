"""The Celery app, its tasks and the per-process model runtime."""
