"""The durable label store (SQLAlchemy), label import/export, and mock labelers."""
