"""Identifiers that become topic levels and storage path segments, so only safe text."""

import re
from typing import Annotated

from pydantic import Field

SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
SafeId = Annotated[str, Field(pattern=SAFE_ID.pattern)]

# A scheduler group's name: a topic level's suffix (`flotta/v1-{group}`) and a store path
# segment, so only safe text, and short.
GROUP = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
GroupName = Annotated[str, Field(pattern=GROUP.pattern)]
