"""The one error type of the HTTP layer: a status code and the one-line message a client sees."""

from __future__ import annotations

from typing import Optional


class ServiceError(Exception):
    """Answered as ``{"error": {"message": ..., "field": ...}}`` with ``status``."""

    def __init__(self, status: int, message: str, field: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "field": self.field}}
