"""Persistence: SQLAlchemy 2 models, sessions, and the repository functions the service uses."""
