"""sortline: waste-photo classification over Celery, Redis and SQL."""

__version__ = "0.1.0"
