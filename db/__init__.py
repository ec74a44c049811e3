"""sortline's database layer: SQLAlchemy models, engine and session, service functions."""
