"""Identifiers that become topic levels and storage path segments, so only safe text."""

from typing import Annotated

from pydantic import Field

SafeId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")]
