"""Configuration: one settings object read from the environment, and logging setup."""

from config.settings import Settings, get_settings

__all__ = ["Settings", "get_settings"]
