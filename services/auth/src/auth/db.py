"""The accounts database: SQLAlchemy over SQLite by default, PostgreSQL through DATABASE_URL.

``DATABASE_URL`` examples: ``sqlite:////var/lib/auth/auth.sqlite3`` (default
``sqlite:////tmp/auth.sqlite3``), ``postgresql+psycopg://auth:secret@db:5432/auth``.
``DB_POOL_SIZE`` (default 5) and ``DB_MAX_OVERFLOW`` (default 5) size the connection pool,
``DB_POOL_TIMEOUT`` (seconds, default 5) bounds the wait for a free connection.
"""

from __future__ import annotations

from collections.abc import Mapping

from servicekit import env_int, env_str
from sqlalchemy import Engine, Integer, LargeBinary, String, create_engine, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

DEFAULT_URL = "sqlite:////tmp/auth.sqlite3"


class Base(DeclarativeBase):
    pass


class Account(Base):
    __tablename__ = "accounts"

    username: Mapped[str] = mapped_column(String(32), primary_key=True)
    salt: Mapped[bytes] = mapped_column(LargeBinary(16))
    password_hash: Mapped[bytes] = mapped_column(LargeBinary(64))


class SessionRow(Base):
    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    username: Mapped[str] = mapped_column(String(32), index=True)
    expires_at: Mapped[int] = mapped_column(Integer)


class Database:
    """One engine with a bounded pool; the tables are created at start-up."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.url = env_str("DATABASE_URL", DEFAULT_URL, env)
        self.pool_size = env_int("DB_POOL_SIZE", 5, env)
        self.max_overflow = env_int("DB_MAX_OVERFLOW", 5, env)
        self.engine: Engine = create_engine(
            self.url,
            pool_size=self.pool_size,
            max_overflow=self.max_overflow,
            pool_timeout=env_int("DB_POOL_TIMEOUT", 5, env),
            pool_pre_ping=True,
        )
        Base.metadata.create_all(self.engine)

    def ping(self) -> bool:
        """Readiness: a connection answers ``SELECT 1``."""
        with self.engine.connect() as conn:
            return bool(conn.execute(text("SELECT 1")).scalar_one() == 1)
