"""The risk verbs: flag, unflag, flags, impact; and apps (app register, app list)."""

from __future__ import annotations
